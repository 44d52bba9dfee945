//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), as Cilium uses
//! it for traffic from outside the cluster: a lookup table of `M` slots (a
//! prime, Cilium's default 16381) in which every backend holds about `M/N`
//! slots, filled from each backend's own permutation of the slots. A
//! connection's hash picks a slot, so every node picks the same backend
//! for it without sharing state, and when a backend goes only a small
//! share of the other backends' slots change hands (the tests measure
//! how small).

/// A stable 64-bit hash (FNV-1a) of `bytes` after `seed`: every node
/// computes the same permutation for the same backend.
fn hash(seed: u8, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in std::iter::once(&seed).chain(bytes) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits mix poorly for short keys: a splitmix64 finish.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The lookup table for `backends` (each a stable name, e.g. its
/// `address:port`), `m` slots (a prime): each slot holds the index of a
/// backend. Empty when there is no backend.
pub fn table(backends: &[String], m: u32) -> Vec<u32> {
    let n = backends.len();
    if n == 0 || m == 0 {
        return Vec::new();
    }
    let m64 = u64::from(m);
    // Each backend's permutation: offset + j * skip (mod m).
    let perm: Vec<(u64, u64)> = backends
        .iter()
        .map(|b| {
            let offset = hash(1, b.as_bytes()) % m64;
            let skip = hash(2, b.as_bytes()) % (m64 - 1).max(1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut entry = vec![u32::MAX; m as usize];
    let mut filled = 0u32;
    'fill: loop {
        for (i, (offset, skip)) in perm.iter().enumerate() {
            // The backend's next preferred slot that is still free.
            let mut c = (offset + next[i] * skip) % m64;
            while entry[c as usize] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m64;
            }
            entry[c as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize, salt: u32) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.{}.{}.{}:8080", salt % 250, i / 250, i % 250))
            .collect()
    }

    #[test]
    fn every_backend_gets_its_share() {
        let backends = names(10, 1);
        let t = table(&backends, abi::MAGLEV_DEFAULT_TABLE_SIZE);
        assert_eq!(t.len(), abi::MAGLEV_DEFAULT_TABLE_SIZE as usize);
        let mut counts = [0u32; 10];
        for b in &t {
            counts[*b as usize] += 1;
        }
        // Maglev fills round-robin: shares differ by at most one slot
        // per round a backend had to skip; within 5% of M/N here.
        for c in counts {
            assert!((1556..=1720).contains(&c), "{counts:?}");
        }
        assert!(table(&[], abi::MAGLEV_DEFAULT_TABLE_SIZE).is_empty());
        assert_eq!(table(&backends[..1], 251), vec![0; 251]);
    }

    #[test]
    fn the_table_depends_on_the_backends_not_their_order() {
        // Same names, other order: each slot names the same backend.
        let backends = names(7, 2);
        let mut reversed = backends.clone();
        reversed.reverse();
        let (a, b) = (table(&backends, 1021), table(&reversed, 1021));
        let differ = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| backends[**x as usize] != reversed[**y as usize])
            .count();
        // Ties between backends wanting one slot in the same round go
        // to the first: a few slots only.
        assert!(differ * 100 < 1021 * 2, "{differ} slots differ");
    }

    /// The share of the table's slots that change backend, beyond the
    /// removed backend's own, when backend `gone` of `backends` leaves.
    fn disruption(backends: &[String], gone: usize) -> f64 {
        let before = table(backends, abi::MAGLEV_DEFAULT_TABLE_SIZE);
        let mut rest = backends.to_vec();
        rest.remove(gone);
        let after = table(&rest, abi::MAGLEV_DEFAULT_TABLE_SIZE);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b as usize != gone && backends[**b as usize] != rest[**a as usize])
            .count();
        moved as f64 / f64::from(abi::MAGLEV_DEFAULT_TABLE_SIZE)
    }

    #[test]
    fn removals_move_about_one_percent_beyond_their_own() {
        // Every backend of 5 to 100 removed in turn, ten sets of names
        // each: ~1% (under 1.25%) of the others' slots move on average,
        // under 2% for 99
        // removals in 100 (Maglev's near-minimal disruption; a removal
        // that reshuffles the fill order now and then moves a few %).
        let mut shares = Vec::new();
        for n in [5usize, 13, 30, 60, 100] {
            for salt in 0..10u32 {
                let backends = names(n, salt);
                for gone in 0..n {
                    shares.push(disruption(&backends, gone));
                }
            }
        }
        shares.sort_by(f64::total_cmp);
        let mean = shares.iter().sum::<f64>() / shares.len() as f64;
        let p99 = shares[shares.len() * 99 / 100];
        let worst = shares[shares.len() - 1];
        eprintln!(
            "maglev M=16381, {} removals: {:.2}% of the others' slots move on average, {:.2}% at p99, {:.2}% at worst",
            shares.len(),
            mean * 100.0,
            p99 * 100.0,
            worst * 100.0
        );
        assert!(mean <= 0.0125, "mean {:.2}%", mean * 100.0);
        assert!(p99 <= 0.02, "p99 {:.2}%", p99 * 100.0);
    }

    proptest! {
        // A fixed seed: the same 64 cases every run (the sweep above is
        // the statistical claim; this one hunts for outliers).
        #![proptest_config(ProptestConfig {
            cases: 64,
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x6d61_676c_6576),
            ..ProptestConfig::default()
        })]
        /// A backend leaving moves its own slots and at most a few percent
        /// of the others' (about 1% on average: the sweep above), for 2
        /// to 100 backends on the default table.
        #[test]
        fn removing_a_backend_moves_little_beyond_its_own(
            n in 2usize..=100,
            salt in 0u32..1000,
            gone_seed in any::<usize>(),
        ) {
            let backends = names(n, salt);
            let gone = gone_seed % n;
            let share = disruption(&backends, gone);
            prop_assert!(share <= 0.06, "{n} backends, removing #{gone}: {:.2}% of the others' slots moved", share * 100.0);
        }
    }
}
