//! Where PID 1's configuration comes from: `--config PATH` if given, else the
//! kernel command line's `tether.config=PATH`, else QEMU's fw_cfg entry
//! `opt/tether/config`, else `/etc/tether/config.json` in the initramfs.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError, config_error as err};

/// The fw_cfg entry the appliance fills (`-fw_cfg name=opt/tether/config,file=...`).
pub const FW_CFG_CONFIG: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/tether/config/raw";
/// The config an initramfs may carry.
pub const DEFAULT_CONFIG: &str = "/etc/tether/config.json";

/// The kernel command line, as `key[=value]` parameters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KernelCmdline {
    params: Vec<(String, Option<String>)>,
}

impl KernelCmdline {
    /// Splits a command line as the kernel does: on spaces outside double
    /// quotes, quotes removed; what follows `--` is init's and not a parameter.
    pub fn parse(text: &str) -> Self {
        let mut params = Vec::new();
        let mut word = String::new();
        let mut quoted = false;
        let mut words = Vec::new();
        for c in text.chars() {
            match c {
                '"' => quoted = !quoted,
                c if c.is_whitespace() && !quoted => {
                    if !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    }
                }
                c => word.push(c),
            }
        }
        if !word.is_empty() {
            words.push(word);
        }
        for w in words {
            if w == "--" {
                break;
            }
            match w.split_once('=') {
                Some((k, v)) => params.push((k.to_owned(), Some(v.to_owned()))),
                None => params.push((w, None)),
            }
        }
        Self { params }
    }

    /// Reads `/proc/cmdline` (empty if it cannot be read).
    pub fn read() -> Self {
        Self::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())
    }

    /// The value of the last `key=value` (the kernel's rule: the last wins).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
    }
}

/// Where the config is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// `--config PATH`.
    Argument(PathBuf),
    /// `tether.config=PATH` on the kernel command line.
    Cmdline(PathBuf),
    /// QEMU's fw_cfg.
    FwCfg(PathBuf),
    /// The initramfs's own.
    Default(PathBuf),
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Argument(p) => write!(f, "{} (--config)", p.display()),
            Self::Cmdline(p) => write!(
                f,
                "{} (tether.config= on the kernel command line)",
                p.display()
            ),
            Self::FwCfg(p) => write!(f, "fw_cfg opt/tether/config ({})", p.display()),
            Self::Default(p) => write!(f, "{}", p.display()),
        }
    }
}

impl ConfigSource {
    fn path(&self) -> &Path {
        match self {
            Self::Argument(p) | Self::Cmdline(p) | Self::FwCfg(p) | Self::Default(p) => p,
        }
    }
}

/// Picks the source by the rule above; `fw_cfg_present` says whether the
/// fw_cfg entry exists.
pub fn choose(
    argument: Option<&Path>,
    cmdline: &KernelCmdline,
    fw_cfg_present: bool,
) -> ConfigSource {
    if let Some(p) = argument {
        return ConfigSource::Argument(p.to_path_buf());
    }
    if let Some(p) = cmdline.get("tether.config").filter(|p| !p.is_empty()) {
        return ConfigSource::Cmdline(p.into());
    }
    if fw_cfg_present {
        return ConfigSource::FwCfg(FW_CFG_CONFIG.into());
    }
    ConfigSource::Default(DEFAULT_CONFIG.into())
}

/// Reads and validates the config from `source`. A relative `host_key` path
/// resolves against the config file's directory (against `/` for fw_cfg).
pub fn load(source: &ConfigSource) -> Result<Config, ConfigError> {
    let path = source.path();
    let bytes =
        std::fs::read(path).map_err(|e| err(source.to_string(), format!("cannot read: {e}")))?;
    // fw_cfg blobs may be padded with NULs.
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let text = std::str::from_utf8(&bytes[..end])
        .map_err(|e| err(source.to_string(), format!("not UTF-8: {e}")))?;
    let base = match source {
        ConfigSource::FwCfg(_) => Some(Path::new("/")),
        _ => path.parent(),
    };
    Config::parse(text, base)
}

/// The `link` a config names, read leniently from text that may not be a
/// valid config: where to report that it is not.
pub fn link_of_unusable_config(source: &ConfigSource) -> Option<String> {
    let text = std::fs::read_to_string(source.path()).ok()?;
    let value: serde_json::Value = serde_json::from_str(text.trim_end_matches('\0')).ok()?;
    value.get("link")?.as_str().map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_split_like_the_kernel_does() {
        let c = KernelCmdline::parse(
            "console=ttyS1 quiet panic=-1 \"tether.config=/etc/my config.json\" rw x=1 x=2 -- tether.config=/init-arg\n",
        );
        assert_eq!(c.get("console"), Some("ttyS1"));
        assert_eq!(c.get("tether.config"), Some("/etc/my config.json"));
        assert_eq!(c.get("x"), Some("2"), "the last one wins");
        assert_eq!(c.get("rw"), None, "a flag has no value");
        assert_eq!(KernelCmdline::parse("a=\"b c\"").get("a"), Some("b c"));
    }

    #[test]
    fn the_config_comes_from_the_argument_then_cmdline_then_fw_cfg_then_the_default() {
        let with = KernelCmdline::parse("tether.config=/cfg.json");
        let without = KernelCmdline::parse("console=ttyS1");
        assert_eq!(
            choose(Some(Path::new("/a.json")), &with, true),
            ConfigSource::Argument("/a.json".into())
        );
        assert_eq!(
            choose(None, &with, true),
            ConfigSource::Cmdline("/cfg.json".into())
        );
        assert_eq!(
            choose(None, &without, true),
            ConfigSource::FwCfg(FW_CFG_CONFIG.into())
        );
        assert_eq!(
            choose(None, &without, false),
            ConfigSource::Default(DEFAULT_CONFIG.into())
        );
    }

    #[test]
    fn an_unreadable_or_bad_config_names_its_source_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let missing = ConfigSource::Cmdline(dir.path().join("none.json"));
        let e = load(&missing).unwrap_err().to_string();
        assert!(
            e.contains("tether.config=") && e.contains("cannot read"),
            "{e}"
        );

        let bad = dir.path().join("bad.json");
        std::fs::write(
            &bad,
            "{\"id\": \"c1\", \"link\": \"tcp:127.0.0.1:9\", \"colour\": 1}\0\0",
        )
        .unwrap();
        let source = ConfigSource::FwCfg(bad);
        assert!(load(&source).unwrap_err().to_string().contains("colour"));
        assert_eq!(
            link_of_unusable_config(&source).as_deref(),
            Some("tcp:127.0.0.1:9")
        );
    }
}
