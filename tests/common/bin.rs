//! The real `llmproxy` binary as a child process, its log lines collected.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_llmproxy");

/// A running `llmproxy` process with its log lines collected.
pub struct Bin {
    pub child: Child,
    pub addr: std::net::SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Bin {
    pub async fn start(args: &[&str], env: &[(&str, &str)]) -> Bin {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .env("NO_COLOR", "1");
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let collected = logs.clone();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line.clone());
                collected.lock().unwrap().push(line);
            }
        });
        let addr = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(line) = rx.recv().await {
                if line.contains("llmproxy serving") {
                    let at = line.find("listen").unwrap();
                    let rest = line[at..].trim_start_matches(|c: char| !c.is_ascii_digit());
                    let end = rest
                        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
                        .unwrap_or(rest.len());
                    return rest[..end].parse().unwrap();
                }
            }
            panic!("llmproxy exited before serving");
        })
        .await
        .expect("llmproxy did not start");
        Bin {
            child,
            addr,
            logs,
            reader: Some(reader),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().unwrap();
        std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
    }

    /// Waits for the process to exit and for its last log lines (flushed
    /// at exit) to be read.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("did not exit in time")
            .unwrap();
        if let Some(reader) = self.reader.take() {
            tokio::time::timeout(Duration::from_secs(5), reader)
                .await
                .expect("stderr not closed after exit")
                .unwrap();
        }
        status
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}
