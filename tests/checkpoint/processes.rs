//! Several processes saving to one path (every rank saving "its" checkpoint under one name into
//! a shared folder is a common slip): every save succeeds and the file left is whole (issue 21,
//! scenario 6). The savers are this test binary run again, one ignored test each.

use std::process::Command;

use candle_core::{DType, Device, Result};
use candle_grad_clip::TrainingCheckpoint;

use crate::common::seeded_varmap;
use crate::temp_dir;

/// Set in a child: `<path> <rank>`.
const SAVER_ENV: &str = "CGC_TEST_CHECKPOINT_SAVER";
const SAVES: usize = 20;

const SPECS: [(&str, &[usize], DType); 2] =
    [("w", &[256, 256], DType::F32), ("b", &[256], DType::F32)];

/// One process's saves (run by the test below; a no-op elsewhere).
#[test]
#[ignore = "run by saves_from_several_processes_to_one_path_all_succeed in child processes"]
fn child_saver() -> Result<()> {
    let Ok(spec) = std::env::var(SAVER_ENV) else {
        return Ok(());
    };
    let (path, rank) = spec.rsplit_once(' ').expect("<path> <rank>");
    let rank: u64 = rank.parse().expect("a rank");
    let vm = seeded_varmap(rank, &SPECS)?;
    for step in 0..SAVES as u64 {
        TrainingCheckpoint::new(&vm, step)?
            .with_metadata("rank", rank.to_string())
            .save(path)?;
    }
    Ok(())
}

#[test]
fn saves_from_several_processes_to_one_path_all_succeed() -> Result<()> {
    let dir = temp_dir("processes");
    let path = dir.join("ckpt.safetensors");
    let exe = std::env::current_exe()?;
    let children: Vec<_> = (0..4u64)
        .map(|rank| {
            Command::new(&exe)
                .args([
                    "processes::child_saver",
                    "--exact",
                    "--ignored",
                    "--test-threads=1",
                ])
                .env(SAVER_ENV, format!("{} {rank}", path.display()))
                .output()
        })
        .collect::<std::io::Result<_>>()?;
    for (rank, out) in children.iter().enumerate() {
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "rank {rank}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The last rename wins: one rank's whole checkpoint, verified, and nothing else is left.
    let ck = TrainingCheckpoint::load(&path)?;
    let rank: u64 = ck.metadata("rank").expect("rank").parse().expect("a rank");
    assert_eq!(ck.step(), SAVES as u64 - 1);
    let expected = seeded_varmap(rank, &SPECS)?;
    for (name, _, _) in SPECS {
        let saved = crate::common::bits(&ck.var(name, &Device::Cpu)?)?;
        assert_eq!(
            saved,
            crate::common::bits(&crate::var(&expected, name))?,
            "{name}"
        );
    }
    assert_eq!(std::fs::read_dir(&dir)?.count(), 1);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
