//! Stop strings matched on decoded text, across token boundaries, and the
//! hold-back that keeps a partial match from being streamed.

/// Where a stop string was found: byte offset of its start and its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopMatch {
    pub start: usize,
    pub index: usize,
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The earliest occurrence of any stop string that starts at or after byte
/// `floor` (a char boundary: where this run's text begins) and ends after
/// byte `new_from` of `text` (text before it was already searched).
pub fn find_stop(text: &str, floor: usize, new_from: usize, stops: &[String]) -> Option<StopMatch> {
    let longest = stops.iter().map(String::len).max()?;
    // Why the floor: looking back before it would find the stop string that
    // ended the previous run, and that match, dropped as not this run's,
    // would hide a real one starting at the floor.
    let from = floor_char_boundary(text, new_from.saturating_sub(longest.saturating_sub(1))).max(floor);
    let hay = &text[from..];
    stops
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_empty())
        .filter_map(|(index, s)| hay.find(s.as_str()).map(|p| StopMatch { start: from + p, index }))
        .min_by_key(|m| (m.start, m.index))
}

/// Length of the longest suffix of `text` that is a proper prefix of some
/// stop string: text that must not be streamed yet.
pub fn partial_stop_len(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > best && text.ends_with(&s[..i]) {
                best = i;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_stop_string_split_across_tokens_is_found_where_it_starts() {
        let s = stops(&["\n\n"]);
        // "...7.\n" then "\nNext": searched from the second piece.
        let text = "3 + 4 = 7.\n\nNext";
        let m = find_stop(text, 0, 11, &s).unwrap();
        assert_eq!(m, StopMatch { start: 10, index: 0 });
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let s = stops(&["END", "\n\n", "x"]);
        let m = find_stop("ab\n\ncdENDx", 0, 0, &s).unwrap();
        assert_eq!(m, StopMatch { start: 2, index: 1 });
        assert_eq!(find_stop("no match here", 0, 0, &s), None);
    }

    #[test]
    fn text_that_could_begin_a_stop_string_is_held_back() {
        let s = stops(&["\n\n", "STOP"]);
        assert_eq!(partial_stop_len("answer\n", &s), 1);
        assert_eq!(partial_stop_len("answer ST", &s), 2);
        assert_eq!(partial_stop_len("answer", &s), 0);
    }

    #[test]
    fn multibyte_text_is_searched_on_char_boundaries() {
        let s = stops(&["é!"]);
        let text = "café!";
        let m = find_stop(text, 0, 4, &s).unwrap();
        assert_eq!(&text[m.start..], "é!");
        assert_eq!(partial_stop_len("caf\u{e9}", &s), "é".len());
    }

    #[test]
    fn a_stop_string_right_after_the_one_that_ended_the_last_run_is_found() {
        let s = stops(&["\n\n"]);
        // The previous run ended at "7\n\n"; this run starts at byte 3 and
        // its first token is another "\n\n".
        let text = "a 7\n\n\n\n";
        assert_eq!(find_stop(text, 5, 5, &s), Some(StopMatch { start: 5, index: 0 }));
        // Text left after the stop string by the token that completed it is
        // this run's and is searched from the floor.
        let text = "7\n\n\n\nx";
        assert_eq!(find_stop(text, 3, 3, &s), Some(StopMatch { start: 3, index: 0 }));
    }
}
