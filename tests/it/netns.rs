//! Several "hosts" on one machine: network namespaces joined by a bridge that lives in a
//! namespace of its own, so the machine's real network is never touched. Needs root and
//! `ip`; a test using it fails (never skips) without them. Addresses are 10.77.0.0/24,
//! used only inside these namespaces. A `Lan` deletes its namespaces and kills the
//! processes it started (by their ids) when dropped, on every path, panics included.

#![allow(dead_code)]

use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

const PREFIX: &str = "st-";

/// A bridge namespace and `hosts` host namespaces, host `i` (from 0) at 10.77.0.(i+1)/24.
pub struct Lan {
    /// Every namespace created so far, bridge first (deleted in reverse).
    namespaces: Vec<String>,
    hosts: Vec<String>,
    children: Vec<Child>,
}

fn ip(args: &[&str]) {
    let o =
        Command::new("ip").args(args).output().unwrap_or_else(|e| panic!("cannot run `ip {}`: {e}", args.join(" ")));
    assert!(o.status.success(), "`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim());
}

/// Fails with a clear message when the test cannot create namespaces.
fn require_root_and_ip() {
    let uid = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
    });
    assert_eq!(
        uid.as_deref(),
        Some("0"),
        "this test creates network namespaces and must run as root (CI does); run `sudo -E cargo test -p strata-coordinator --test it discovery`"
    );
    let ok = Command::new("ip")
        .args(["netns", "list"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "`ip netns` is not available: install iproute2 (`apt-get install iproute2`)");
}

/// Deletes namespaces left by test runs whose process is gone (a run killed with SIGKILL
/// cannot clean up after itself).
fn remove_stale() {
    let Ok(o) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

impl Lan {
    pub fn new(hosts: usize) -> Lan {
        assert!((1..=250).contains(&hosts));
        require_root_and_ip();
        remove_stale();
        let tag = format!("{PREFIX}{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mut lan = Lan { namespaces: Vec::new(), hosts: Vec::new(), children: Vec::new() };
        let sw = format!("{tag}-sw");
        ip(&["netns", "add", &sw]);
        lan.namespaces.push(sw.clone());
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for i in 1..=hosts {
            let ns = format!("{tag}-n{i}");
            ip(&["netns", "add", &ns]);
            lan.namespaces.push(ns.clone());
            lan.hosts.push(ns.clone());
            let veth = format!("veth{i}");
            ip(&["-n", &sw, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            ip(&["-n", &sw, "link", "set", &veth, "master", "br0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let o = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns,
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ])
                .output()
                .expect("run sysctl in the namespace");
            assert!(o.status.success(), "disabling IPv6 in {ns}: {}", String::from_utf8_lossy(&o.stderr));
            ip(&["-n", &ns, "addr", "add", &format!("10.77.0.{i}/24"), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "eth0"]);
        }
        lan
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: usize) -> String {
        assert!(i < self.hosts.len());
        format!("10.77.0.{}", i + 1)
    }

    /// A command run inside host `i`'s namespace.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i]]).arg(program);
        crate::support::isolate(&mut c);
        c
    }

    /// Starts `cmd` (from `command`) as a process this `Lan` kills on drop; returns its index.
    pub fn spawn(&mut self, mut cmd: Command) -> usize {
        let child = cmd.spawn().expect("spawn a process in a namespace");
        self.children.push(child);
        self.children.len() - 1
    }

    pub fn child(&mut self, idx: usize) -> &mut Child {
        &mut self.children[idx]
    }

    /// Kills (SIGKILL, by process id) a process started with `spawn` and reaps it.
    pub fn kill(&mut self, idx: usize) {
        let c = &mut self.children[idx];
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Runs `cmd` to completion.
    pub fn output(&self, mut cmd: Command) -> Output {
        cmd.output().expect("run a process in a namespace")
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // `ip netns exec` execs the program, so the child's id is the program's own.
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
