//! A long-lived child process spoken to in JSON lines: what `--reward-command` and
//! `--tool-command` run. `sh -c CMD` is started once; each request is one line on its
//! stdin, each answer one line on its stdout, in order; its stderr is the run's. A crash,
//! a closed pipe or no answer within the timeout is an error naming the option, the
//! command and the request.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

pub struct LineProgram {
    /// The option that named it (`--reward-command`), for errors.
    option: &'static str,
    /// The option that sets the timeout (`--reward-timeout`), for errors.
    timeout_option: &'static str,
    command: String,
    timeout: Duration,
    io: Mutex<ProgramIo>,
}

struct ProgramIo {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<std::io::Result<String>>,
    /// Requests sent whose answers are not read yet.
    unread: usize,
}

impl LineProgram {
    pub fn start(
        (option, timeout_option): (&'static str, &'static str),
        command: &str,
        timeout: Duration,
    ) -> Result<Self> {
        let mut child = Command::new("sh")
            .args(["-c", command])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("{option} '{command}': cannot start it"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped");
        // A reader thread, so that waiting for an answer can time out.
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(LineProgram {
            option,
            timeout_option,
            command: command.to_string(),
            timeout,
            io: Mutex::new(ProgramIo {
                child,
                stdin,
                lines,
                unread: 0,
            }),
        })
    }

    /// An error about request `row` of a batch (`what` the request is called in it: "response 3
    /// of the batch"), with the program's exit status when it has exited.
    pub fn error(&self, what: &str, message: &str) -> anyhow::Error {
        let mut io = self.io.lock().expect("not poisoned");
        self.fail(&mut io, what, message)
    }

    fn fail(&self, io: &mut ProgramIo, what: &str, message: &str) -> anyhow::Error {
        let status = match io.child.try_wait() {
            Ok(Some(status)) => format!(" (it exited: {status})"),
            _ => String::new(),
        };
        anyhow!(
            "{} '{}': {what}: {message}{status}",
            self.option,
            self.command
        )
    }

    /// A line of its output as errors show it: its first 80 characters.
    pub fn shown(line: &str) -> String {
        line.chars().take(80).collect()
    }

    /// Sends every request (one JSON value each, written as one line) and reads one answer
    /// line per request. `name(i)` names request `i` in errors.
    pub fn ask(
        &self,
        requests: &[serde_json::Value],
        name: &dyn Fn(usize) -> String,
    ) -> Result<Vec<String>> {
        self.send(requests, name)?;
        self.receive(name)
    }

    /// Whether requests were sent whose answers [`Self::receive`] has not read.
    pub fn awaiting(&self) -> bool {
        self.io.lock().expect("not poisoned").unread > 0
    }

    /// Sends every request, one line each, without waiting for the answers (which
    /// [`Self::receive`] reads): several programs then work at once.
    pub fn send(
        &self,
        requests: &[serde_json::Value],
        name: &dyn Fn(usize) -> String,
    ) -> Result<()> {
        let mut io = self.io.lock().expect("not poisoned");
        let mut text = String::new();
        for request in requests {
            text.push_str(&request.to_string());
            text.push('\n');
        }
        let sent = io.stdin.as_mut().map(|stdin| {
            stdin
                .write_all(text.as_bytes())
                .and_then(|()| stdin.flush())
        });
        if !matches!(sent, Some(Ok(()))) {
            return Err(self.fail(&mut io, &name(0), "cannot write to it"));
        }
        io.unread += requests.len();
        Ok(())
    }

    /// Reads the answers to every request sent and not answered yet, one line each, in
    /// order.
    pub fn receive(&self, name: &dyn Fn(usize) -> String) -> Result<Vec<String>> {
        let mut io = self.io.lock().expect("not poisoned");
        let n = std::mem::take(&mut io.unread);
        let mut answers = Vec::with_capacity(n);
        for i in 0..n {
            let line = match io.lines.recv_timeout(self.timeout) {
                Ok(Ok(line)) => line,
                Ok(Err(e)) => {
                    return Err(self.fail(
                        &mut io,
                        &name(i),
                        &format!("cannot read its output: {e}"),
                    ))
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = io.child.kill();
                    let message = format!(
                        "no answer within {} {} s",
                        self.timeout_option,
                        self.timeout.as_secs_f64()
                    );
                    return Err(self.fail(&mut io, &name(i), &message));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = io.child.wait();
                    return Err(self.fail(
                        &mut io,
                        &name(i),
                        "its output ended before this answer",
                    ));
                }
            };
            answers.push(line);
        }
        Ok(answers)
    }
}

impl Drop for LineProgram {
    fn drop(&mut self) {
        if let Ok(io) = self.io.get_mut() {
            drop(io.stdin.take()); // EOF: a well-behaved program exits
            let _ = io.child.kill();
            let _ = io.child.wait();
        }
    }
}
