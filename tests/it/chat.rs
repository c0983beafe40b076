//! `strata chat` in a real process with its stdin and stdout piped: streamed greedy
//! answers equal to `strata run --chat`, `/reset`, and Ctrl-C (SIGINT) stopping an
//! answer without quitting.

use std::io::{Read, Write};
use std::process::{ChildStdin, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use crate::support::{fixture, path_str, strata, strata_json};

/// Everything the chat printed so far, fed by a reader thread.
struct Screen {
    rx: Receiver<Vec<u8>>,
    bytes: Vec<u8>,
    /// `bytes` as text (decoded whole: a character may be split across reads).
    text: String,
}

impl Screen {
    fn take(&mut self, b: Vec<u8>) {
        self.bytes.extend(b);
        self.text = String::from_utf8_lossy(&self.bytes).into_owned();
    }

    /// Waits (at most 120 s) until the output after byte `from` contains `needle`;
    /// returns the offset just past it.
    fn wait_for(&mut self, from: usize, needle: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(i) = self.text[from..].find(needle) {
                return from + i + needle.len();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(bytes) => self.take(bytes),
                Err(_) => panic!("no {needle:?} in the chat's output:\n{}", self.text),
            }
        }
    }
}

fn say(stdin: &mut ChildStdin, line: &str) {
    writeln!(stdin, "{line}").unwrap();
    stdin.flush().unwrap();
}

#[test]
fn chat_streams_resets_and_survives_ctrl_c() {
    let model = fixture("tiny-qwen3.gguf");
    let m = path_str(&model);
    let alone = strata_json(&[
        "run",
        "--json",
        "--model",
        m,
        "--chat",
        "--prompt",
        "Hello",
        "--max-tokens",
        "200",
        "--temperature",
        "0",
    ]);
    let expected = alone["text"].as_str().unwrap().to_owned();
    // The interrupt below must land in the middle of an answer: greedy, this one runs
    // to the length limit, so it is still going after its first characters.
    assert_eq!(alone["stop_reason"], "length", "{alone:#}");

    let mut child = strata()
        .args(["chat", "--model", m, "--temperature", "0", "--max-tokens", "200"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start strata chat");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut screen = Screen { rx, bytes: Vec::new(), text: String::new() };
    let mut at = screen.wait_for(0, "> ");

    // A greedy answer, streamed: what `strata run --chat` says to the same first message.
    say(&mut stdin, "Hello");
    let end = screen.wait_for(at, "\n> ");
    let answer = screen.text[at..end - 3].trim_end_matches(" [length limit]").to_owned();
    assert_eq!(answer, expected, "chat's first answer differs from `strata run --chat`");
    at = end;

    // Ctrl-C in the middle of a long answer stops it; the chat goes on.
    say(&mut stdin, "/reset");
    at = screen.wait_for(at, "(conversation cleared)");
    at = screen.wait_for(at, "> ");
    let pid = child.id().to_string();
    let asked = at;
    say(&mut stdin, "Hello");
    let deadline = Instant::now() + Duration::from_secs(120);
    while screen.text.len() < at + 10 {
        let left = deadline.saturating_duration_since(Instant::now());
        let b = screen.rx.recv_timeout(left).unwrap_or_else(|_| panic!("no answer started:\n{}", screen.text));
        screen.take(b);
    }
    std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap();
    at = screen.wait_for(at, " [stopped]\n");
    assert!(!screen.text[asked..at].contains("[length limit]"), "the answer ran to its end:\n{}", screen.text);
    at = screen.wait_for(at, "> ");

    // Still alive: after /reset the same question gets the same greedy answer.
    say(&mut stdin, "/reset");
    at = screen.wait_for(at, "(conversation cleared)");
    at = screen.wait_for(at, "> ");
    say(&mut stdin, "Hello");
    let end = screen.wait_for(at, "\n> ");
    assert_eq!(screen.text[at..end - 3].trim_end_matches(" [length limit]"), expected, "after Ctrl-C and /reset");

    // Ctrl-D (end of input) quits cleanly.
    drop(stdin);
    let status = child.wait().unwrap();
    assert!(status.success(), "strata chat exited with {status}:\n{}", screen.text);
}
