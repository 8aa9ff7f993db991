//! Kernel modules: the boot list (`/etc/tether/modules`, loaded before the
//! config is read: virtio, fw_cfg, 9p, ext4...) and the config's `modules`,
//! each after the modules it depends on, as `modules.dep` lists them. Loaded
//! with `finit_module`; a module already loaded is fine.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use tracing::{debug, info, warn};

use crate::config::{ConfigError, config_error as err};

/// The boot list.
pub const BOOT_LIST: &str = "/etc/tether/modules";

/// Validates `modules` (names only: whether they exist is known in the VM).
pub fn validate(names: Vec<String>) -> Result<Vec<String>, ConfigError> {
    for (i, n) in names.iter().enumerate() {
        if n.is_empty()
            || !n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(err(
                format!("modules[{i}]"),
                format!("{n:?} is not a module name"),
            ));
        }
    }
    Ok(names)
}

/// A module that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("module {name}: not in {dep} (nor built into the kernel)")]
    Unknown { name: String, dep: String },
    #[error("module {name}: depends on itself through {through}")]
    Cycle { name: String, through: String },
    #[error("module {name} ({path}): {error}")]
    Load {
        name: String,
        path: String,
        error: io::Error,
    },
}

/// The module names of a boot list: one a line, `#` comments.
pub fn parse_list(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// `modules.dep`: each module's file and the files it needs.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    /// name -> (file, dependency files), paths relative to the modules dir.
    by_name: BTreeMap<String, (String, Vec<String>)>,
    by_file: BTreeMap<String, Vec<String>>,
    builtin: BTreeSet<String>,
}

/// `ext4`, `virtio-net` and `virtio_net.ko.xz` all name the same module.
pub fn module_name(name_or_file: &str) -> String {
    let base = name_or_file.rsplit('/').next().unwrap_or(name_or_file);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

impl ModuleIndex {
    /// Parses `modules.dep` (`kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko ...`)
    /// and `modules.builtin` (one file a line).
    pub fn parse(dep: &str, builtin: &str) -> Self {
        let mut index = Self::default();
        for line in dep.lines() {
            let Some((file, deps)) = line.split_once(':') else {
                continue;
            };
            let deps: Vec<String> = deps.split_whitespace().map(String::from).collect();
            index
                .by_name
                .insert(module_name(file), (file.to_owned(), deps.clone()));
            index.by_file.insert(file.to_owned(), deps);
        }
        index.builtin = builtin
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(module_name)
            .collect();
        index
    }

    /// Whether the kernel has this module built in.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&module_name(name))
    }

    /// The files to load for `name`, each after the ones it needs; `None` for a
    /// built-in module.
    pub fn load_order(&self, name: &str) -> Result<Option<Vec<String>>, ModuleError> {
        let name = module_name(name);
        let Some((file, _)) = self.by_name.get(&name) else {
            if self.is_builtin(&name) {
                return Ok(None);
            }
            return Err(ModuleError::Unknown {
                name,
                dep: "modules.dep".into(),
            });
        };
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        let mut path = Vec::new();
        self.visit(file, &mut path, &mut done, &mut order)
            .map_err(|through| ModuleError::Cycle {
                name: name.clone(),
                through,
            })?;
        Ok(Some(order))
    }

    /// Depth first: a module's dependencies (each with its own) before it.
    fn visit(
        &self,
        file: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), String> {
        if done.contains(file) {
            return Ok(());
        }
        if path.iter().any(|p| p == file) {
            return Err(file.to_owned());
        }
        path.push(file.to_owned());
        for dep in self.by_file.get(file).into_iter().flatten() {
            self.visit(dep, path, done, order)?;
        }
        path.pop();
        done.insert(file.to_owned());
        order.push(file.to_owned());
        Ok(())
    }
}

/// The running kernel's modules directory.
pub fn modules_dir() -> PathBuf {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Path::new("/lib/modules").join(release.trim())
}

/// Reads the index of a modules directory (empty when it has none).
pub fn read_index(dir: &Path) -> ModuleIndex {
    let dep = std::fs::read_to_string(dir.join("modules.dep")).unwrap_or_default();
    let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    ModuleIndex::parse(&dep, &builtin)
}

/// Loads `names` with their dependencies from `dir`. A name the index does not
/// know is an error if `strict` (the config asked for it), else a warning (a
/// boot list may name modules some kernels build in).
pub fn load(
    dir: &Path,
    index: &ModuleIndex,
    names: &[String],
    strict: bool,
) -> Result<(), ModuleError> {
    for name in names {
        let files = match index.load_order(name) {
            Ok(Some(files)) => files,
            Ok(None) => {
                debug!("module {name} is built in");
                continue;
            }
            Err(ModuleError::Unknown { .. }) if is_loaded(name) => continue,
            Err(ModuleError::Unknown { name, .. }) if !strict => {
                warn!(
                    "module {name}: not in {}; skipped",
                    dir.join("modules.dep").display()
                );
                continue;
            }
            Err(ModuleError::Unknown { name, .. }) => {
                return Err(ModuleError::Unknown {
                    name,
                    dep: dir.join("modules.dep").display().to_string(),
                });
            }
            Err(e) => return Err(e),
        };
        for file in files {
            let path = dir.join(&file);
            if is_loaded(&module_name(&file)) {
                continue;
            }
            match insert_module(&path) {
                Ok(true) => info!("loaded module {}", module_name(&file)),
                Ok(false) => {}
                Err(error) => {
                    return Err(ModuleError::Load {
                        name: module_name(&file),
                        path: path.display().to_string(),
                        error,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Whether the kernel has this module (loaded, or built in with parameters).
fn is_loaded(name: &str) -> bool {
    Path::new("/sys/module").join(module_name(name)).exists()
}

/// Loads one module file; `false` if it was loaded already.
fn insert_module(path: &Path) -> io::Result<bool> {
    use nix::kmod::{ModuleInitFlags, finit_module};
    let file = std::fs::File::open(path)?;
    // A compressed file needs a kernel that decompresses (CONFIG_MODULE_DECOMPRESS);
    // the initramfs normally holds them decompressed.
    let compressed = [".xz", ".zst", ".gz"]
        .iter()
        .any(|ext| path.to_string_lossy().ends_with(ext));
    let flags = if compressed {
        ModuleInitFlags::from_bits_retain(4) // MODULE_INIT_COMPRESSED_FILE
    } else {
        ModuleInitFlags::empty()
    };
    match finit_module(&file, c"", flags) {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/lib/crc16.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko kernel/fs/fscache/fscache.ko
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko
kernel/net/9p/9pnet.ko:
kernel/fs/netfs/netfs.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/x/a.ko: kernel/x/b.ko
kernel/x/b.ko: kernel/x/a.ko
";

    fn index() -> ModuleIndex {
        ModuleIndex::parse(
            DEP,
            "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_pci.ko\n",
        )
    }

    #[test]
    fn dependencies_load_before_the_modules_that_need_them() {
        let order = index().load_order("virtio-net").unwrap().unwrap();
        assert_eq!(
            order,
            [
                "kernel/net/core/failover.ko",
                "kernel/drivers/net/net_failover.ko",
                "kernel/drivers/net/virtio_net.ko"
            ]
        );
        let order = index().load_order("9p").unwrap().unwrap();
        let pos = |f: &str| order.iter().position(|o| o.ends_with(f)).unwrap();
        assert!(pos("netfs.ko") < pos("fscache.ko"));
        assert!(pos("fscache.ko") < pos("9p.ko") && pos("9pnet.ko") < pos("9p.ko"));
        assert_eq!(order.len(), 4, "each file once: {order:?}");
    }

    #[test]
    fn builtin_unknown_and_cyclic_modules() {
        assert_eq!(index().load_order("virtio_pci").unwrap(), None);
        assert!(matches!(
            index().load_order("nope"),
            Err(ModuleError::Unknown { .. })
        ));
        assert!(matches!(
            index().load_order("a"),
            Err(ModuleError::Cycle { .. })
        ));
    }

    #[test]
    fn names_are_normalised_and_lists_parsed() {
        assert_eq!(
            module_name("kernel/net/9p/9pnet_virtio.ko.xz"),
            "9pnet_virtio"
        );
        assert_eq!(module_name("virtio-blk"), "virtio_blk");
        assert_eq!(
            parse_list("# boot modules\nvirtio_pci\n\n  ext4  # root disk\n"),
            ["virtio_pci", "ext4"]
        );
        assert_eq!(
            validate(vec!["ext4".into(), "9pnet_virtio".into()])
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            validate(vec!["ext4".into(), "../x".into()])
                .unwrap_err()
                .path,
            "modules[1]"
        );
    }

    #[test]
    fn an_unknown_module_fails_only_when_the_config_asked_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["no_such_module_here".to_owned()];
        assert!(load(dir.path(), &index(), &names, false).is_ok());
        let e = load(dir.path(), &index(), &names, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no_such_module_here") && e.contains("modules.dep"),
            "{e}"
        );
    }
}
