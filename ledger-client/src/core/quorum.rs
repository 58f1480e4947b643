//! Quorum arithmetic of round-robin striping (DESIGN.md §2): which ensemble positions hold an
//! entry, when fencing responses cover every ack quorum, and when an entry is known absent.

/// Ensemble positions of `entry`'s write set: (entry + i) mod E for i in 0..Qw.
pub fn write_set(entry: u64, ensemble_size: usize, write_quorum: usize) -> Vec<usize> {
    let e = ensemble_size as u64;
    (0..write_quorum as u64)
        .map(|i| ((entry + i) % e) as usize)
        .collect()
}

/// True when the positions marked in `heard` leave no write set with Qa silent members, so every
/// possible ack quorum of every entry contains a bookie that answered. Fencing those bookies means
/// the old writer can no longer gather Qa acks for any entry.
pub fn covers(heard: &[bool], write_quorum: usize, ack_quorum: usize) -> bool {
    let e = heard.len();
    (0..e).all(|start| {
        let silent = (0..write_quorum)
            .filter(|i| !heard[(start + i) % e])
            .count();
        silent < ack_quorum
    })
}

/// True when `no_entry` bookies of a write set said "no such entry": any Qa of the Qw then include
/// one of them, so no ack quorum holds the entry and it was never acknowledged.
pub fn known_absent(no_entry: usize, write_quorum: usize, ack_quorum: usize) -> bool {
    no_entry > write_quorum - ack_quorum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn striping_wraps() {
        assert_eq!(write_set(0, 3, 3), vec![0, 1, 2]);
        assert_eq!(write_set(4, 5, 3), vec![4, 0, 1]);
        assert_eq!(write_set(7, 5, 2), vec![2, 3]);
    }

    #[test]
    fn coverage_needs_qw_minus_qa_plus_one_per_write_set() {
        // E=3 Qw=3 Qa=2: two answers cover, one does not.
        assert!(covers(&[true, true, false], 3, 2));
        assert!(!covers(&[true, false, false], 3, 2));
        // E=5 Qw=3 Qa=2: every window of 3 needs 2 answers.
        assert!(covers(&[true, true, false, true, true], 3, 2));
        assert!(!covers(&[true, false, false, true, true], 3, 2));
        // Qa=1: every single bookie of every write set must answer.
        assert!(!covers(&[true, true, false], 3, 1));
        assert!(covers(&[true, true, true], 3, 1));
    }

    #[test]
    fn absence_needs_qw_minus_qa_plus_one_no_answers() {
        assert!(known_absent(1, 3, 3));
        assert!(!known_absent(1, 3, 2));
        assert!(known_absent(2, 3, 2));
        assert!(!known_absent(2, 3, 1));
        assert!(known_absent(3, 3, 1));
    }
}
