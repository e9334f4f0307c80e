//! Resources that run on top of a volume on its primary: filesystem mounts, NFS exports,
//! floating IP addresses and arbitrary start/stop commands. Started in configuration
//! order after promotion, stopped in reverse order before demotion.

use crate::cluster::config::ResourceConfig;
use std::process::Command;

/// Why a resource did not start or stop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {problem}")]
pub struct ResourceError {
    pub resource: String,
    pub problem: String,
}

fn describe(resource: &ResourceConfig) -> String {
    match resource {
        ResourceConfig::Mount {
            device, mountpoint, ..
        } => {
            format!("mount {device} on {}", mountpoint.display())
        }
        ResourceConfig::NfsExport { path, .. } => format!("nfs-export {}", path.display()),
        ResourceConfig::Ip { address, interface } => format!("ip {address} on {interface}"),
        ResourceConfig::Exec { start, .. } => format!("exec `{start}`"),
    }
}

fn run(resource: &ResourceConfig, program: &str, args: &[&str]) -> Result<(), ResourceError> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| ResourceError {
            resource: describe(resource),
            problem: format!("cannot run {program}: {e}"),
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ResourceError {
            resource: describe(resource),
            problem: format!(
                "`{program} {}` failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}

fn is_mounted(mountpoint: &std::path::Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(&*mountpoint.to_string_lossy()))
        })
        .unwrap_or(false)
}

/// Starts one resource. Idempotent: starting a running resource succeeds.
pub fn start(resource: &ResourceConfig) -> Result<(), ResourceError> {
    match resource {
        ResourceConfig::Mount {
            device,
            mountpoint,
            fstype,
            options,
        } => {
            if is_mounted(mountpoint) {
                return Ok(());
            }
            std::fs::create_dir_all(mountpoint).map_err(|e| ResourceError {
                resource: describe(resource),
                problem: format!("cannot create the mount point: {e}"),
            })?;
            // A filesystem left dirty by the failed primary is replayed/checked first.
            if fstype.starts_with("ext") {
                let _ = Command::new("e2fsck").args(["-p", device]).output();
            }
            let mp = mountpoint.to_string_lossy();
            match options {
                Some(o) => run(resource, "mount", &["-t", fstype, "-o", o, device, &mp]),
                None => run(resource, "mount", &["-t", fstype, device, &mp]),
            }
        }
        ResourceConfig::NfsExport {
            path,
            clients,
            options,
        } => {
            let spec = format!("{clients}:{}", path.display());
            let opts = options
                .clone()
                .unwrap_or_else(|| "rw,sync,no_subtree_check,fsid=0".into());
            run(resource, "exportfs", &["-o", &opts, &spec])
        }
        ResourceConfig::Ip { address, interface } => {
            let present = Command::new("ip")
                .args(["-o", "addr", "show", "dev", interface])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {address} ")))
                .unwrap_or(false);
            if !present {
                run(resource, "ip", &["addr", "add", address, "dev", interface])?;
            }
            // Tell the segment where the address lives now (best effort).
            let ip = address.split('/').next().unwrap_or(address);
            let _ = Command::new("arping")
                .args(["-U", "-c", "1", "-I", interface, ip])
                .output();
            Ok(())
        }
        ResourceConfig::Exec { start, .. } => run(resource, "sh", &["-c", start]),
    }
}

/// Stops one resource. Idempotent: stopping a stopped resource succeeds.
pub fn stop(resource: &ResourceConfig) -> Result<(), ResourceError> {
    match resource {
        ResourceConfig::Mount { mountpoint, .. } => {
            if !is_mounted(mountpoint) {
                return Ok(());
            }
            run(resource, "umount", &[&mountpoint.to_string_lossy()])
        }
        ResourceConfig::NfsExport { path, clients, .. } => {
            let spec = format!("{clients}:{}", path.display());
            let _ = run(resource, "exportfs", &["-u", &spec]);
            Ok(())
        }
        ResourceConfig::Ip { address, interface } => {
            let _ = run(resource, "ip", &["addr", "del", address, "dev", interface]);
            Ok(())
        }
        ResourceConfig::Exec { stop, .. } => run(resource, "sh", &["-c", stop]),
    }
}

/// Starts resources in order; on failure stops those already started and reports.
pub fn start_all(resources: &[ResourceConfig]) -> Result<(), ResourceError> {
    for (i, resource) in resources.iter().enumerate() {
        if let Err(e) = start(resource) {
            for started in resources[..i].iter().rev() {
                let _ = stop(started);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Stops resources in reverse order; reports the first failure but tries them all.
pub fn stop_all(resources: &[ResourceConfig]) -> Result<(), ResourceError> {
    let mut first_error = None;
    for resource in resources.iter().rev() {
        if let Err(e) = stop(resource) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_resources_start_in_order_stop_in_reverse_and_roll_back() {
        let dir = std::env::temp_dir().join(format!("tandem-res-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        let exec = |name: &str| ResourceConfig::Exec {
            start: format!("echo start-{name} >> {}", log.display()),
            stop: format!("echo stop-{name} >> {}", log.display()),
        };
        let resources = [exec("a"), exec("b")];
        start_all(&resources).unwrap();
        stop_all(&resources).unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "start-a\nstart-b\nstop-b\nstop-a\n"
        );
        std::fs::remove_file(&log).unwrap();
        let failing = [
            exec("a"),
            ResourceConfig::Exec {
                start: "exit 3".into(),
                stop: "true".into(),
            },
        ];
        let err = start_all(&failing).unwrap_err();
        assert!(err.problem.contains("exit status: 3"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "start-a\nstop-a\n",
            "rolled back"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
