//! Monte-Carlo labels through a remote engine: the rows
//! [`super::labels::label_batch`] makes on the local engine, made with
//! `/v1/completions` calls instead. Trajectories extend one step at a time
//! (one call per distinct prefix, `n` = the trajectories sharing it, as the
//! reasoning strategies do over an engine); each new prefix gets one call
//! of `n` = N_MC continuations to the end, checked against the answer. The
//! engine gives child `i` of a call `seed + i`, so seeds advance by the
//! choices already asked for.

use std::collections::HashSet;
use std::sync::Arc;

use super::labels::{LabelConfig, LabelRow, qhash, split_of, with_success};
use crate::arith::task::{self, Problem, STEP_DELIMITER};
use crate::config::RemoteEngine;
use crate::engine::SamplingParams;
use crate::remote::reasoning::{StepEnd, read_step, step_call};
use crate::remote::upstream::{CompletionCall, Upstream};
use crate::tokenizer::{AddSpecial, ChatMessage, Tokenizer};

/// Labels questions through one engine; owns the runtime its calls run on,
/// so that `ponder calibrate` stays a blocking command.
pub struct RemoteLabeler {
    rt: tokio::runtime::Runtime,
    upstream: Upstream,
    tokenizer: Arc<Tokenizer>,
}

/// One trajectory being extended.
#[derive(Clone, Default)]
struct Path {
    steps: Vec<String>,
    text: String,
    ids: Vec<u32>,
}

impl RemoteLabeler {
    pub fn new(engine: &RemoteEngine, tokenizer: Arc<Tokenizer>) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        Ok(Self { rt, upstream: Upstream::new(engine), tokenizer })
    }

    /// Labels `problems` together (their calls reach the engine at once).
    pub fn label_batch(&self, problems: &[Problem], cfg: &LabelConfig) -> anyhow::Result<Vec<LabelRow>> {
        let per_question = self
            .rt
            .block_on(futures::future::try_join_all(problems.iter().map(|p| self.label_question(p, cfg))))?;
        Ok(per_question.into_iter().flatten().collect())
    }

    async fn label_question(&self, p: &Problem, cfg: &LabelConfig) -> anyhow::Result<Vec<LabelRow>> {
        let tok = &self.tokenizer;
        let text = tok.apply_chat_template(&[ChatMessage::new("user", p.question.clone())])?;
        let prompt = tok.encode(&text, AddSpecial::No)?;
        let base = cfg.seed ^ qhash(&p.id);
        let sampling = SamplingParams::sampled(cfg.temperature, base);
        let row = |k: usize, path: &Path| prefix_row(p, &prompt, k, path);
        // Rows, and the continuations each prefix row waits for.
        let mut rows = vec![row(0, &Path::default())];
        let mut rollouts = vec![(0, self.rollout(&prompt, &Path::default(), p.answer, cfg, base ^ 0x5EED))];
        let mut seen: HashSet<String> = HashSet::from([String::new()]);
        let mut live = vec![Path::default(); cfg.n_val];
        let mut draws = 0u64;
        while !live.is_empty() {
            // One call per distinct prefix (or several, where the engine
            // takes fewer choices per call).
            let groups = self.group_by_prefix(live.drain(..));
            let calls: Vec<CompletionCall> = groups
                .iter()
                .map(|g| {
                    let seed = base.wrapping_add(draws);
                    draws += g.len() as u64;
                    let call_prompt = prompt.iter().chain(&g[0].ids).copied().collect();
                    step_call(
                        self.upstream.model(),
                        call_prompt,
                        g.len(),
                        cfg.max_step_tokens,
                        &sampling,
                        seed,
                    )
                })
                .collect();
            let answers =
                futures::future::try_join_all(calls.iter().map(|c| self.upstream.complete(c))).await?;
            for (group, answer) in groups.into_iter().zip(answers) {
                let mut choices = answer.choices;
                choices.sort_by_key(|c| c.index);
                anyhow::ensure!(
                    choices.len() == group.len(),
                    "the engine answered {} choices for n = {}",
                    choices.len(),
                    group.len()
                );
                for (mut path, choice) in group.into_iter().zip(choices) {
                    let step = read_step(choice, tok);
                    path.text.push_str(&step.text);
                    path.ids.extend_from_slice(&step.ids);
                    let trimmed = step.text.trim_end();
                    if !trimmed.is_empty() {
                        path.steps.push(trimmed.to_string());
                    }
                    let more = step.end == StepEnd::Delimiter
                        && !step.text.contains("The answer is")
                        && path.steps.len() < cfg.max_prefix
                        && path.ids.len() < cfg.max_tokens;
                    if !more {
                        if seen.insert(format!("final:{}", path.text)) {
                            let mut r = row(path.steps.len(), &path);
                            r.correct = usize::from(task::is_correct(&path.text, p.answer));
                            r.final_answer = true;
                            rows.push(r);
                        }
                        continue;
                    }
                    if seen.insert(path.steps.join(STEP_DELIMITER)) {
                        let idx = rows.len();
                        rows.push(row(path.steps.len(), &path));
                        let seed = qhash(&p.id) ^ (idx as u64) << 20;
                        rollouts.push((idx, self.rollout(&prompt, &path, p.answer, cfg, seed)));
                    }
                    live.push(path);
                }
            }
        }
        let (idx, calls): (Vec<usize>, Vec<_>) = rollouts.into_iter().unzip();
        let results = futures::future::try_join_all(calls).await?;
        for (i, (correct, n)) in idx.into_iter().zip(results) {
            rows[i].correct = correct;
            rows[i].n_mc = n;
        }
        Ok(rows.into_iter().map(with_success).collect())
    }

    /// The live paths grouped so that one call serves a group: paths with
    /// the same prefix share a call, split where the engine takes fewer
    /// choices per call.
    fn group_by_prefix(&self, live: impl Iterator<Item = Path>) -> Vec<Vec<Path>> {
        let mut shared: Vec<Vec<Path>> = Vec::new();
        for path in live {
            match shared.iter_mut().find(|g| g[0].ids == path.ids) {
                Some(g) => g.push(path),
                None => shared.push(vec![path]),
            }
        }
        let mut groups: Vec<Vec<Path>> = Vec::new();
        for g in shared {
            for (offset, count) in self.upstream.split_n(g.len()) {
                groups.push(g[offset..offset + count].to_vec());
            }
        }
        groups
    }

    /// N_MC continuations of `path` to the end: how many reach the answer,
    /// of how many came back.
    fn rollout(
        &self,
        prompt: &[u32],
        path: &Path,
        answer: i64,
        cfg: &LabelConfig,
        seed: u64,
    ) -> impl Future<Output = anyhow::Result<(usize, usize)>> + use<> {
        let sampling = SamplingParams::sampled(cfg.temperature, seed);
        let calls: Vec<CompletionCall> = self
            .upstream
            .split_n(cfg.n_mc)
            .into_iter()
            .map(|(offset, count)| CompletionCall {
                stop: Vec::new(),
                include_stop_str_in_output: false,
                return_token_ids: false,
                return_tokens: false,
                max_tokens: cfg.max_tokens.saturating_sub(path.ids.len()).max(1),
                ..step_call(
                    self.upstream.model(),
                    prompt.iter().chain(&path.ids).copied().collect(),
                    count,
                    1,
                    &sampling,
                    seed.wrapping_add(offset as u64),
                )
            })
            .collect();
        let (upstream, prefix) = (self.upstream.clone(), path.text.clone());
        async move {
            let answers = futures::future::try_join_all(calls.iter().map(|c| upstream.complete(c))).await?;
            let choices = answers.iter().flat_map(|a| &a.choices);
            let (correct, n) = choices.fold((0, 0), |(k, n), c| {
                (k + usize::from(task::is_correct(&format!("{prefix}{}", c.text), answer)), n + 1)
            });
            Ok((correct, n))
        }
    }
}

/// The label row of `path`'s first `k` steps (its labels filled in later).
fn prefix_row(p: &Problem, prompt: &[u32], k: usize, path: &Path) -> LabelRow {
    LabelRow {
        question_id: p.id.clone(),
        split: split_of(&p.id),
        level: p.level,
        k,
        prefix: path.steps.clone(),
        tokens: prompt.iter().chain(&path.ids).copied().collect(),
        prompt_len: prompt.len(),
        logprobs: Vec::new(),
        success: 0.0,
        correct: 0,
        n_mc: 0,
        final_answer: false,
    }
}
