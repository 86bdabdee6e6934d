//! Surprisal features of a PRM that reads its own LM head: how unlikely the
//! PRM, as a language model, finds the tokens of each reasoning step. A
//! step whose written result differs from what the PRM would have written
//! (a wrong digit) is a surprise; a 2-class head then judges a step from
//! that evidence and its hidden state instead of having to learn the
//! comparison itself from one label per step.

/// Features per step tag.
pub const COUNT: usize = 3;

/// A token is "not the PRM's own choice" when its probability is below 1/2.
const UNLIKELY_NATS: f32 = std::f32::consts::LN_2;

/// Where the steps begin: just after the last occurrence of `marker` (the
/// token ids that open the assistant turn) before `first_tag`; 0 when it
/// does not occur (then every token before the first tag counts as step text).
pub fn steps_start(ids: &[u32], marker: &[u32], first_tag: usize) -> usize {
    if marker.is_empty() || first_tag < marker.len() {
        return 0;
    }
    (0..=first_tag - marker.len())
        .rev()
        .find(|&i| ids[i..i + marker.len()] == *marker)
        .map_or(0, |i| i + marker.len())
}

/// For each tag (positions, ascending), from the surprisal of every token
/// (`surprisal[i]`: −ln P(token i | tokens before it), in nats):
/// - ln(1 + the largest surprisal among the step tokens of the prefix),
/// - ln(1 + the largest surprisal among the tokens of the tag's own step),
/// - ln(1 + how many step tokens of the prefix had probability below 1/2).
///
/// Step tokens are those from `start` on, tags excluded. The logarithms
/// keep a token the PRM ruled out (30 nats) from dwarfing the rest.
pub fn features(surprisal: &[f32], start: usize, tags: &[usize]) -> Vec<[f32; COUNT]> {
    let (mut prefix_max, mut unlikely) = (0f32, 0usize);
    let mut from = start;
    let mut out = Vec::with_capacity(tags.len());
    for &tag in tags {
        let mut step_max = 0f32;
        for &s in surprisal.get(from..tag).unwrap_or(&[]) {
            step_max = step_max.max(s);
            unlikely += usize::from(s > UNLIKELY_NATS);
        }
        prefix_max = prefix_max.max(step_max);
        out.push([prefix_max.ln_1p(), step_max.ln_1p(), (unlikely as f32).ln_1p()]);
        from = tag + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_start_after_the_last_assistant_marker_before_the_first_tag() {
        let ids = [1, 9, 9, 5, 1, 7, 4, 4, 2, 4, 2];
        assert_eq!(steps_start(&ids, &[1, 7], 8), 6);
        assert_eq!(steps_start(&ids, &[3, 3], 8), 0, "no marker: from the start");
        assert_eq!(steps_start(&ids, &[], 8), 0);
    }

    #[test]
    fn a_surprising_token_marks_its_step_and_every_later_prefix() {
        // start 2; tags at 5 and 8: step one is tokens 2..5, step two 6..8.
        let s = [9.0, 9.0, 0.1, 0.2, 0.0, 0.0, 3.0, 0.1, 0.0];
        let f = features(&s, 2, &[5, 8]);
        assert_eq!(f.len(), 2);
        assert!((f[0][0] - 0.2f32.ln_1p()).abs() < 1e-6, "tokens before the start do not count");
        assert_eq!(f[0][2], 0.0);
        assert!((f[1][0] - 3.0f32.ln_1p()).abs() < 1e-6);
        assert!((f[1][1] - 3.0f32.ln_1p()).abs() < 1e-6);
        assert!((f[1][2] - 1f32.ln_1p()).abs() < 1e-6);
        // The question alone: a tag with no step tokens.
        assert_eq!(features(&s, 4, &[4]), vec![[0.0, 0.0, 0.0]]);
    }
}
