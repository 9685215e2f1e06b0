//! `--config FILE`: any option of a subcommand set from a TOML file, with flags on the
//! command line overriding it. Keys are the long option names (`max-length` or
//! `max_length`); an unknown key or a value of the wrong type is an error naming the file
//! and the key.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{ArgAction, CommandFactory, FromArgMatches};

/// Parses the command line of a binary whose first argument is a subcommand, folding in
/// the subcommand's `--config` file. Exits with clap's message on bad usage.
pub fn parse<C: CommandFactory + FromArgMatches>() -> C {
    let argv: Vec<OsString> = std::env::args_os().collect();
    match expand(&argv, C::command()) {
        Ok(argv) => {
            let matches = C::command().args_override_self(true).get_matches_from(argv);
            C::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
        }
        Err(message) => {
            eprintln!("error: {message}");
            std::process::exit(2);
        }
    }
}

fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    argv.iter().enumerate().find_map(|(i, a)| {
        let a = a.to_str()?;
        if a == "--config" {
            argv.get(i + 1).map(PathBuf::from)
        } else {
            a.strip_prefix("--config=").map(PathBuf::from)
        }
    })
}

/// `argv` with the config file's options inserted right after the subcommand, so that
/// the command line's own flags (later, with `args_override_self`) win.
pub fn expand(argv: &[OsString], cmd: clap::Command) -> Result<Vec<OsString>, String> {
    let Some(path) = config_path(argv) else {
        return Ok(argv.to_vec());
    };
    let Some(sub_name) = argv.get(1).and_then(|s| s.to_str()) else {
        return Ok(argv.to_vec());
    };
    let Some(sub) = cmd.find_subcommand(sub_name).cloned() else {
        return Ok(argv.to_vec());
    };
    let mut out = argv[..2].to_vec();
    // A list option given on the command line replaces the file's list (single options
    // are overridden by clap itself).
    let on_line = |long: &str| {
        argv[2..].iter().any(|a| {
            a.to_str()
                .is_some_and(|a| a == format!("--{long}") || a.starts_with(&format!("--{long}=")))
        })
    };
    for (long, args) in toml_options(&path, &sub)? {
        let is_list = sub.get_arguments().any(|a| {
            a.get_long() == Some(long.as_str()) && matches!(a.get_action(), ArgAction::Append)
        });
        if !(is_list && on_line(&long)) {
            out.extend(args.into_iter().map(OsString::from));
        }
    }
    out.extend_from_slice(&argv[2..]);
    Ok(out)
}

/// Each option a TOML file sets (its long name) with its command-line arguments.
fn toml_options(path: &Path, cmd: &clap::Command) -> Result<Vec<(String, Vec<String>)>, String> {
    let at = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{at}: cannot read: {e}"))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("{at}: invalid TOML: {e}"))?;
    let known: Vec<&str> = cmd
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| *l != "config" && *l != "help" && *l != "version")
        .collect();
    let mut options = vec![];
    for (key, value) in &table {
        let mut args = vec![];
        let long = key.replace('_', "-");
        let Some(arg) = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
        else {
            return Err(format!(
                "{at}: unknown key '{key}' (known: {})",
                known.join(", ")
            ));
        };
        let is_flag = matches!(arg.get_action(), ArgAction::SetTrue);
        let text = match value {
            toml::Value::Boolean(b) if is_flag => {
                if *b {
                    args.push(format!("--{long}"));
                }
                options.push((long, args));
                continue;
            }
            _ if is_flag => return Err(format!("{at}: key '{key}' must be true or false")),
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            // A list: the option given once per item (`data = ["a.jsonl", "b.jsonl:2"]`).
            toml::Value::Array(items) if matches!(arg.get_action(), ArgAction::Append) => {
                for item in items {
                    let text = match item {
                        toml::Value::String(s) => s.clone(),
                        toml::Value::Integer(i) => i.to_string(),
                        toml::Value::Float(f) => f.to_string(),
                        _ => {
                            return Err(format!(
                                "{at}: key '{key}': expected a list of strings or numbers"
                            ))
                        }
                    };
                    args.push(format!("--{long}"));
                    args.push(text);
                }
                options.push((long, args));
                continue;
            }
            other => return Err(format!("{at}: key '{key}': unsupported value {other}")),
        };
        // Check the value with the option's own parser, alone, to name the key on failure.
        clap::Command::new("config")
            .arg(arg.clone().required(false))
            .try_get_matches_from(["config".to_string(), format!("--{long}"), text.clone()])
            .map_err(|e| {
                let reason = e.to_string();
                let reason = reason
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches("error: ");
                format!("{at}: key '{key}': {reason}")
            })?;
        args.push(format!("--{long}"));
        args.push(text);
        options.push((long, args));
    }
    Ok(options)
}

/// A resolved configuration as TOML (written to `OUT/config.toml` before step 0).
pub fn to_toml<T: serde::Serialize>(config: &T) -> String {
    toml::to_string(config).unwrap_or_else(|e| format!("# could not serialise: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Debug, Subcommand)]
    enum Cmd {
        Train {
            #[arg(long)]
            model: String,
            #[arg(long, default_value_t = 1e-5)]
            lr: f64,
            #[arg(long, default_value_t = 8)]
            batch_size: usize,
            #[arg(long)]
            resume: bool,
            #[arg(long)]
            data: Vec<String>,
            #[arg(long, value_delimiter = ',')]
            weights: Vec<f64>,
            #[arg(long)]
            config: Option<PathBuf>,
        },
    }

    fn run(toml: &str, cli: &[&str]) -> Result<Cli, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        let mut argv: Vec<OsString> = vec![
            "bin".into(),
            "train".into(),
            "--config".into(),
            path.clone().into(),
        ];
        argv.extend(cli.iter().map(OsString::from));
        let argv =
            expand(&argv, Cli::command()).map_err(|e| e.replace(path.to_str().unwrap(), "FILE"))?;
        let m = Cli::command()
            .args_override_self(true)
            .try_get_matches_from(argv)
            .map_err(|e| e.to_string())?;
        Cli::from_arg_matches(&m).map_err(|e| e.to_string())
    }

    #[test]
    fn file_sets_and_flags_override() {
        let cli = run(
            "model = 'm'\nlr = 0.5\nbatch_size = 4\nresume = true",
            &["--lr", "0.25"],
        )
        .unwrap();
        let Cmd::Train {
            model,
            lr,
            batch_size,
            resume,
            ..
        } = cli.cmd;
        assert_eq!(
            (model.as_str(), lr, batch_size, resume),
            ("m", 0.25, 4, true)
        );
    }

    /// A list option: a TOML string or list (of strings or numbers); on the command line, repeated flags add up
    /// and replace the file's list.
    #[test]
    fn lists_come_from_the_file_unless_the_line_gives_them() {
        let data = |toml: &str, line: &[&str]| {
            let Cmd::Train { data, .. } = run(toml, line).unwrap().cmd;
            data
        };
        assert_eq!(data("model = 'm'\ndata = 'a'", &[]), ["a"]);
        assert_eq!(data("model = 'm'\ndata = ['a', 'b:2']", &[]), ["a", "b:2"]);
        assert_eq!(
            data(
                "model = 'm'\ndata = ['a', 'b']",
                &["--data", "c", "--data", "d"]
            ),
            ["c", "d"]
        );
        // Numbers too (`config.toml` writes `loss_weights = [1.0, 0.5]`).
        let Cmd::Train { weights, .. } = run("model = 'm'\nweights = [1.0, 0.5]", &[]).unwrap().cmd;
        assert_eq!(weights, [1.0, 0.5]);
        assert_eq!(data("model = 'm'\ndata = [1]", &[]), ["1"]);
        let e = run("model = 'm'\ndata = [true]", &[]).unwrap_err();
        assert!(
            e.contains("key 'data': expected a list of strings or numbers"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let e = run("model = 'm'\nlearning_rate = 1", &[]).unwrap_err();
        assert!(e.starts_with("FILE: unknown key 'learning_rate'"), "{e}");
        let e = run("model = 'm'\nbatch_size = 'many'", &[]).unwrap_err();
        assert!(
            e.starts_with("FILE: key 'batch_size': invalid value 'many'"),
            "{e}"
        );
        let e = run("model = 'm'\nresume = 1", &[]).unwrap_err();
        assert!(e.contains("key 'resume' must be true or false"), "{e}");
        let e = run("model = [", &[]).unwrap_err();
        assert!(e.starts_with("FILE: invalid TOML"), "{e}");
    }
}
