//! `bench-fence`: how long a fence takes, from the call to the confirmed removal of the
//! victim's key — in-process (tandem's policy) and the way fence_scsi does it (sg_persist
//! subprocesses: read keys, preempt, read keys again) — on the same devices, in alternating
//! rounds, with the same setup before each.

use super::cli::{Common, exit};
use super::tasks::now_ms;
use super::{Failure, Opened, open_options};
use serde_json::json;
use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_fence::transport::PrTransport;
use tandem_fence::{FenceMethod, FencePolicy, FenceSettings, PrKey, PreemptFlavour};

const FENCER_KEY: PrKey = PrKey::new(0xbe7c_0000_0000_00f1);
const VICTIM_KEY: PrKey = PrKey::new(0xbe7c_0000_0000_00a1);

fn policy(
    path: &Arc<dyn PrTransport>,
    key: PrKey,
    flavour: PreemptFlavour,
) -> Result<FencePolicy, Failure> {
    Ok(FencePolicy::new(
        key,
        vec![Arc::clone(path)],
        FenceSettings {
            preempt: flavour,
            ..FenceSettings::default()
        },
    )?)
}

/// Victim registered and holding the reservation, fencer registered.
fn setup(victim: &FencePolicy, fencer: &FencePolicy) -> Result<(), Failure> {
    // Start clean: whoever is registered, the fencer clears it all.
    fencer.unfence(now_ms())?;
    let clear = tandem_fence::pr::PrOutCommand::clear(fencer.key());
    fencer.paths()[0].pr_out(&clear)?;
    victim.unfence(now_ms())?;
    fencer.unfence(now_ms())?;
    let info = fencer.paths()[0].read_reservation()?;
    if info.reservation.map(|r| r.key) != Some(victim.key()) {
        return Err(
            anyhow::anyhow!("setup: the victim does not hold the reservation: {info:?}").into(),
        );
    }
    Ok(())
}

fn sg_persist(bin: &str, args: &[&str]) -> Result<String, Failure> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("running {bin}: {e}"))?;
    if !out.status.success() {
        return Err(anyhow::anyhow!(
            "{bin} {}: exit {:?}: {}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The keys listed by `sg_persist -k`.
fn listed_keys(text: &str) -> Vec<PrKey> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("0x"))
        .filter_map(|k| k.parse::<PrKey>().ok())
        .collect()
}

/// fence_scsi's fence: check the victim is registered, preempt(-abort), confirm it is gone.
fn fence_like_fence_scsi(bin: &str, device: &str, flavour: PreemptFlavour) -> Result<(), Failure> {
    let before = listed_keys(&sg_persist(bin, &["-n", "-i", "-k", "-d", device])?);
    if !before.contains(&VICTIM_KEY) {
        return Err(
            anyhow::anyhow!("sg_persist: victim key not registered before the fence").into(),
        );
    }
    let action = match flavour {
        PreemptFlavour::PreemptAndAbort => "-A",
        PreemptFlavour::Preempt => "-P",
    };
    let rk = format!("{:x}", FENCER_KEY.get());
    let sark = format!("{:x}", VICTIM_KEY.get());
    sg_persist(
        bin,
        &[
            "-n", "-o", action, "-T", "5", "-K", &rk, "-S", &sark, "-d", device,
        ],
    )?;
    let after = listed_keys(&sg_persist(bin, &["-n", "-i", "-k", "-d", device])?);
    if after.contains(&VICTIM_KEY) {
        return Err(anyhow::anyhow!("sg_persist: the victim's key is still registered").into());
    }
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) fn run(
    common: &Common,
    fencer_device: &str,
    victim_device: &str,
    rounds: u32,
    flavour: PreemptFlavour,
    bin: &str,
    out: &mut dyn Write,
) -> Result<i32, Failure> {
    let mut opened = Opened;
    let options = open_options(common, false);
    let fencer_path: Arc<dyn PrTransport> = Arc::from(opened.open(fencer_device, &options)?);
    let victim_path: Arc<dyn PrTransport> = Arc::from(opened.open(victim_device, &options)?);
    let fencer = policy(&fencer_path, FENCER_KEY, flavour)?;
    let victim = policy(&victim_path, VICTIM_KEY, flavour)?;
    let mut in_process = Vec::new();
    let mut subprocess = Vec::new();
    let mut methods = Vec::new();
    for round in 0..rounds.max(1) {
        // Alternate which goes first so neither gains from warm caches.
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for in_proc in order {
            setup(&victim, &fencer)?;
            let started = Instant::now();
            if in_proc {
                let record = fencer.fence(VICTIM_KEY, now_ms())?;
                in_process.push(ms(started.elapsed()));
                if record.method == FenceMethod::AlreadyGone {
                    return Err(anyhow::anyhow!("in-process fence found nothing to fence").into());
                }
                methods.push(record.method);
            } else {
                fence_like_fence_scsi(bin, fencer_device, flavour)?;
                subprocess.push(ms(started.elapsed()));
            }
        }
    }
    // Leave the LU as we found it: nobody registered.
    let _ = fencer.leave();
    let raw_in = in_process.clone();
    let raw_sub = subprocess.clone();
    let m_in = median(&mut in_process);
    let m_sub = median(&mut subprocess);
    let ratio = if m_in > 0.0 { m_sub / m_in } else { 0.0 };
    if common.json {
        writeln!(
            out,
            "{}",
            json!({
                "rounds": rounds,
                "flavour": flavour,
                "fencer": fencer_device,
                "victim": victim_device,
                "in_process_ms": raw_in,
                "sg_persist_ms": raw_sub,
                "median_in_process_ms": m_in,
                "median_sg_persist_ms": m_sub,
                "ratio": ratio,
                "methods": methods,
            })
        )?;
    } else {
        writeln!(
            out,
            "fence latency over {rounds} rounds (call to confirmed key removal, {flavour:?}):"
        )?;
        writeln!(
            out,
            "  in-process (tandem-fence):            median {m_in:8.2} ms"
        )?;
        writeln!(
            out,
            "  sg_persist subprocesses (fence_scsi): median {m_sub:8.2} ms"
        )?;
        writeln!(out, "  ratio: {ratio:.1}x")?;
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sg_persist_key_listings() {
        let text = "  PR generation=0x2, 2 registered reservation keys follow:\n    0xa1\n    0xbe7c0000000000f1\n";
        assert_eq!(listed_keys(text), vec![PrKey::new(0xa1), FENCER_KEY]);
        assert!(
            listed_keys("  PR generation=0x0, there are NO registered reservation keys\n")
                .is_empty()
        );
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
