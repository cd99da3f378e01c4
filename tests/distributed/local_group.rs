//! `LocalGroup` handles are ranks (issue 21, part 4): arrivals are counted per rank, a rank that
//! enters a collective while it is already in one gets an error, a timeout names the ranks that
//! never arrived, a dropped handle fails the others instead of leaving them waiting.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use super::*;

/// Issue 21 (4): rank 0's handle used from two threads used to complete a 2-rank round without
/// rank 1 (both calls `Ok` with the sum of two contributions of rank 0), and rank 1's call then
/// waited forever. Now the second call of rank 0 is an error, and the round is rank 0's first
/// call with rank 1's.
#[test]
fn one_rank_used_from_two_threads_is_an_error_not_a_second_rank() {
    let mut ranks = LocalGroup::new(2).expect("group").into_iter();
    let rank0 = Arc::new(ranks.next().expect("rank 0"));
    let rank1 = ranks.next().expect("rank 1");
    let (tx, rx) = mpsc::channel();
    for (who, value, delay) in [("rank 0 first", 1u64, 0), ("rank 0 again", 10, 100)] {
        let (g, tx) = (rank0.clone(), tx.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay));
            let mut words = [value];
            let r = g.all_reduce_sum_u64(&mut words).map(|()| words[0]);
            let _ = tx.send((who, r.map_err(|e| e.to_string())));
        });
    }
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        let mut words = [100u64];
        let r = rank1.all_reduce_sum_u64(&mut words).map(|()| words[0]);
        let _ = tx.send(("rank 1", r.map_err(|e| e.to_string())));
    });
    let mut got = std::collections::BTreeMap::new();
    for _ in 0..3 {
        let (who, r) = rx
            .recv_timeout(HANG)
            .unwrap_or_else(|_| panic!("a rank still waits after {HANG:?}: got {got:?}"));
        got.insert(who, r);
    }
    let again = got["rank 0 again"]
        .as_ref()
        .expect_err("a second call of rank 0");
    assert!(again.contains("already in a collective"), "{again}");
    assert_eq!(
        got["rank 0 first"],
        Ok(101),
        "rank 0's first call with rank 1's"
    );
    assert_eq!(got["rank 1"], Ok(101));
}

/// A rank with a timeout fails, naming the ranks that never arrived; the group is then broken:
/// a rank that was waiting with it, and the late rank, fail too (naming the timeout).
#[test]
fn a_timeout_names_the_ranks_that_never_arrived() {
    let mut ranks = LocalGroup::new(3).expect("group").into_iter();
    let rank0 = ranks
        .next()
        .expect("rank 0")
        .with_timeout(Duration::from_millis(200));
    let rank1 = ranks.next().expect("rank 1");
    let rank2 = ranks.next().expect("rank 2");
    let (tx, rx) = mpsc::channel();
    let tx1 = tx.clone();
    std::thread::spawn(move || {
        let r = rank1.all_reduce_max_u64(&mut [1]);
        let _ = tx1.send(r.map_err(|e| e.to_string()));
    });
    let message = rank0
        .all_reduce_max_u64(&mut [1])
        .expect_err("rank 2 never arrives")
        .to_string();
    assert!(
        message.contains("timed out") && message.contains("rank 2 never arrived"),
        "{message}"
    );
    let waiting = rx.recv_timeout(HANG).expect("rank 1 returns");
    let waiting = waiting.expect_err("rank 1 fails with rank 0's timeout");
    assert!(
        waiting.contains("rank 0 timed out waiting for rank 2"),
        "{waiting}"
    );
    let late = rank2
        .all_reduce_max_u64(&mut [1])
        .expect_err("the group is broken")
        .to_string();
    assert!(late.contains("rank 0 timed out"), "{late}");
    drop(tx);
}

/// A rank whose handle is dropped (its thread returned early, with an error) fails the others'
/// collectives, naming it, instead of leaving them waiting forever.
#[test]
fn a_dropped_handle_fails_the_others_instead_of_hanging() {
    let results = on_ranks_within(3, HANG, |g| {
        if g.rank() == 1 {
            return Ok(());
        }
        let mut words = [1u64];
        g.all_reduce_sum_u64(&mut words).map_err(|e| e.to_string())
    });
    assert!(results[1].is_ok());
    for rank in [0, 2] {
        let message = results[rank].as_ref().expect_err("rank 1 left");
        assert!(
            message.contains("rank 1 left the group"),
            "rank {rank}: {message}"
        );
    }
}

/// The crate's calls with a timeout: a rank that never calls makes the others' clip fail, naming
/// it, within the timeout.
#[test]
fn a_clip_across_ranks_times_out_naming_the_missing_rank() {
    let mut ranks = LocalGroup::new(2).expect("group").into_iter();
    let rank0 = ranks
        .next()
        .expect("rank 0")
        .with_timeout(Duration::from_millis(200));
    let _rank1 = ranks.next().expect("rank 1 (never calls)");
    let (w, mut grads) = one_var(&[3.0, 4.0]).expect("grads");
    let message = clip_grad_norm_across_(std::slice::from_ref(&w), &mut grads, 1.0, &rank0)
        .expect_err("rank 1 never calls")
        .to_string();
    assert!(message.contains("rank 1 never arrived"), "{message}");
    assert_eq!(
        grads.get(&w).expect("grad").to_vec1::<f32>().expect("v"),
        [3.0, 4.0]
    );
}
