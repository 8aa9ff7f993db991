//! `tether`'s command line: `tether [--config PATH] [--link SPEC]`, plus
//! `--help` and `--version`. Hand-written rather than clap, which alone made
//! up a tenth of the guest binary; the messages follow clap's.

use std::ffi::OsString;
use std::path::PathBuf;

/// What `--help` prints.
pub const HELP: &str = "\
tether: PID 1 in a container VM; runs the container's processes and serves their console over SSH

Usage: tether [OPTIONS]

Options:
      --config <CONFIG>  The guest configuration (JSON; see docs/CONFIG.md). Required unless tether is PID 1, which finds it itself (kernel command line `tether.config=PATH`, fw_cfg `opt/tether/config`, /etc/tether/config.json)
      --link <LINK>      The link to the appliance, overriding the config's `link` (e.g. `serial:/dev/ttyS0`, `tcp:HOST:PORT`, `tcp-listen:ADDR:PORT`)
  -h, --help             Print help
  -V, --version          Print version
";

/// The parsed command line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Args {
    /// `--config PATH`: the guest configuration.
    pub config: Option<PathBuf>,
    /// `--link SPEC`: overrides the config's link.
    pub link: Option<String>,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Args),
    Help,
    Version,
}

/// A usage error; its `Display` is the whole message for stderr (exit 2).
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

impl UsageError {
    fn unexpected(arg: &str) -> Self {
        UsageError(format!(
            "error: unexpected argument '{arg}' found\n\nUsage: tether [OPTIONS]\n\nFor more information, try '--help'."
        ))
    }

    fn missing_value(name: &str) -> Self {
        UsageError(format!(
            "error: a value is required for '--{name} <{}>' but none was supplied\n\nFor more information, try '--help'.",
            name.to_uppercase()
        ))
    }

    fn repeated(name: &str) -> Self {
        UsageError(format!(
            "error: the argument '--{name} <{}>' cannot be used multiple times\n\nUsage: tether [OPTIONS]\n\nFor more information, try '--help'.",
            name.to_uppercase()
        ))
    }

    fn not_unicode(name: &str) -> Self {
        UsageError(format!(
            "error: invalid UTF-8 was detected in the value of '--{name} <{}>'\n\nFor more information, try '--help'.",
            name.to_uppercase()
        ))
    }
}

/// Parses the arguments after the program name. `--help` and `--version`
/// win wherever they stand (as with clap, once the rest parsed so far is valid).
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, UsageError> {
    let mut out = Args::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(text) = arg.to_str() else {
            return Err(UsageError::unexpected(&arg.to_string_lossy()));
        };
        match text {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            _ => {}
        }
        let (name, inline) = match text.strip_prefix("--").map(|t| t.split_once('=')) {
            Some(Some((name, value))) => (name, Some(OsString::from(value))),
            Some(None) => (&text[2..], None),
            None => return Err(UsageError::unexpected(text)),
        };
        if name != "config" && name != "link" {
            return Err(UsageError::unexpected(text));
        }
        // As with clap: a path may not be empty, a link spec may (and then
        // fails to parse with its own message).
        // A separate value may not look like a flag: `--config --link x`
        // lacks the config's value.
        let value = match inline.or_else(|| args.next()) {
            Some(v) if v.to_string_lossy().starts_with("--") && !text.contains('=') => {
                return Err(UsageError::missing_value(name));
            }
            Some(v)
                if v.len() > 1 && v.to_string_lossy().starts_with('-') && !text.contains('=') =>
            {
                return Err(UsageError::unexpected(&v.to_string_lossy()));
            }
            Some(v) if !(v.is_empty() && name == "config") => v,
            _ => return Err(UsageError::missing_value(name)),
        };
        if name == "config" {
            if out.config.replace(PathBuf::from(value)).is_some() {
                return Err(UsageError::repeated(name));
            }
        } else {
            let value = value
                .into_string()
                .map_err(|_| UsageError::not_unicode(name))?;
            if out.link.replace(value).is_some() {
                return Err(UsageError::repeated(name));
            }
        }
    }
    Ok(Command::Run(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(args: &[&str]) -> Result<Command, UsageError> {
        parse(args.iter().map(OsString::from))
    }

    fn run(config: Option<&str>, link: Option<&str>) -> Command {
        Command::Run(Args {
            config: config.map(PathBuf::from),
            link: link.map(String::from),
        })
    }

    #[test]
    fn flags_with_separate_or_inline_values() {
        assert_eq!(parse_str(&[]), Ok(run(None, None)));
        assert_eq!(
            parse_str(&["--config", "a.json", "--link", "tcp:h:1"]),
            Ok(run(Some("a.json"), Some("tcp:h:1")))
        );
        assert_eq!(
            parse_str(&["--link=serial:/dev/ttyS0", "--config=x"]),
            Ok(run(Some("x"), Some("serial:/dev/ttyS0")))
        );
        assert_eq!(parse_str(&["--config=-x"]), Ok(run(Some("-x"), None)));
    }

    #[test]
    fn help_and_version() {
        for h in ["-h", "--help"] {
            assert_eq!(parse_str(&[h]), Ok(Command::Help));
            assert_eq!(parse_str(&["--config", "x", h]), Ok(Command::Help));
        }
        for v in ["-V", "--version"] {
            assert_eq!(parse_str(&[v]), Ok(Command::Version));
        }
        assert!(HELP.contains("--config <CONFIG>") && HELP.contains("--link <LINK>"));
    }

    #[test]
    fn usage_errors_name_the_argument() {
        let err = |args: &[&str]| parse_str(args).unwrap_err().to_string();
        assert!(err(&["--bogus"]).starts_with("error: unexpected argument '--bogus' found"));
        assert!(err(&["foo"]).starts_with("error: unexpected argument 'foo' found"));
        assert!(err(&["-x"]).starts_with("error: unexpected argument '-x' found"));
        assert!(err(&["--config"]).starts_with(
            "error: a value is required for '--config <CONFIG>' but none was supplied"
        ));
        assert!(
            err(&["--config="]).starts_with("error: a value is required for '--config <CONFIG>'")
        );
        assert!(err(&["--link"]).starts_with("error: a value is required for '--link <LINK>'"));
        assert_eq!(parse_str(&["--link", ""]), Ok(run(None, Some(""))));
        assert!(
            err(&["--config", "--link", "x"])
                .starts_with("error: a value is required for '--config <CONFIG>'")
        );
        assert!(err(&["--link", "-5"]).starts_with("error: unexpected argument '-5' found"));
        assert!(
            err(&["--config", "a", "--config", "b"]).starts_with(
                "error: the argument '--config <CONFIG>' cannot be used multiple times"
            )
        );
        assert!(err(&["--link=a", "--link", "b"]).contains("'--link <LINK>' cannot be used"));
        for e in [err(&["--bogus"]), err(&["--config"])] {
            assert!(e.ends_with("For more information, try '--help'."), "{e}");
        }
    }
}
