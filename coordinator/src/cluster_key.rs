//! The cluster secret on this machine: `strata init` writes it, every command that talks to
//! nodes reads it (`--cluster-key`, `STRATA_CLUSTER_KEY`, `--cluster-key-file`, else the
//! file `init` wrote). The key itself is never logged; its public fingerprint is.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use strata_proto::security::ClusterKey;
use strata_proto::transport::Security;

use crate::cli::{ClusterArgs, InitArgs};

/// `$XDG_CONFIG_HOME/strata/cluster.key`, else `~/.config/strata/cluster.key`.
pub fn default_key_file() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()).map(PathBuf::from);
    let base =
        xdg.or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("strata").join("cluster.key"))
}

/// The security these flags ask for: the cluster's TLS with the key they name (or the
/// default key file, if there is one), else plain.
pub fn resolve(args: &ClusterArgs) -> anyhow::Result<Security> {
    let (text, source) = if let Some(k) = &args.cluster_key {
        (k.clone(), "--cluster-key / STRATA_CLUSTER_KEY".to_owned())
    } else if let Some(path) = &args.cluster_key_file {
        (read_key_file(path)?, path.display().to_string())
    } else {
        match default_key_file().filter(|p| p.exists()) {
            Some(path) => (read_key_file(&path)?, path.display().to_string()),
            None => return Ok(Security::Plain),
        }
    };
    let key = ClusterKey::parse(&text).with_context(|| format!("the cluster key from {source}"))?;
    tracing::info!(fingerprint = key.fingerprint(), %source, "cluster key");
    Ok(Security::Cluster(key))
}

fn read_key_file(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading the cluster key file {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "the cluster key file is readable by other users: chmod 600 it");
        }
    }
    Ok(text.trim().to_owned())
}

/// `strata init`.
pub fn run_init(args: InitArgs) -> anyhow::Result<()> {
    let path = match args.key_file.clone().or_else(default_key_file) {
        Some(p) => p,
        None => bail!("neither XDG_CONFIG_HOME nor HOME is set: give --key-file PATH"),
    };
    if path.exists() && !args.force {
        bail!(
            "{} already holds a cluster key; --force replaces it (nodes holding the old key then refuse this machine)",
            path.display()
        );
    }
    let (key, text, made) = match &args.key {
        Some(given) => (ClusterKey::parse(given).context("--key")?, given.trim().to_owned(), false),
        None => {
            let (key, text) = ClusterKey::generate()?;
            (key, text, true)
        }
    };
    write_private(&path, &text)?;
    if made {
        // The one time the key is shown: other machines need it.
        println!("{text}");
        eprintln!(
            "wrote a new cluster key to {} (fingerprint {}).\n\
             On every other machine of this cluster run `strata init --key KEY` with the key above\n\
             (or pass --cluster-key / set STRATA_CLUSTER_KEY). Keep it secret: it admits a machine to the cluster.",
            path.display(),
            key.fingerprint()
        );
    } else {
        eprintln!("stored the cluster key in {} (fingerprint {})", path.display(), key.fingerprint());
    }
    Ok(())
}

/// Writes `text` to `path`, readable by its owner only, creating the directory.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    #[cfg(unix)]
    {
        // An existing temporary file keeps its mode: set it again.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    writeln!(f, "{text}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
