//! Monte-Carlo labels (as in Park et al. 2025): for each question, N_val trajectories
//! generated step by step; for every prefix (the empty one included, those
//! holding the final answer dropped, at most `max_prefix` steps), N_MC
//! continuations, and the fraction that reaches the right answer. One JSONL
//! row per distinct prefix, appended per question, so a run can resume.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::arith::task::{self, Problem, STEP_DELIMITER, Split};
use crate::engine::{
    Engine, EosPolicy, FinishReason, HiddenCapture, Logprobs, SamplingParams, SeqOptions, Sequence,
    StopCriteria, child_seed,
};
use crate::tokenizer::{AddSpecial, ChatMessage};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabelConfig {
    pub n_val: usize,
    pub n_mc: usize,
    pub max_prefix: usize,
    pub temperature: f32,
    pub max_step_tokens: usize,
    pub max_tokens: usize,
    pub seed: u64,
}

impl Default for LabelConfig {
    fn default() -> Self {
        Self {
            n_val: 8,
            n_mc: 8,
            max_prefix: 20,
            temperature: 0.7,
            max_step_tokens: 64,
            max_tokens: 256,
            seed: 0,
        }
    }
}

/// One labelled prefix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelRow {
    pub question_id: String,
    pub split: Split,
    pub level: u8,
    /// Steps in the prefix (0: the question alone).
    pub k: usize,
    pub prefix: Vec<String>,
    /// Prompt and prefix token ids; the PRM feature is the hidden state at the last one.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// The policy's logprob of each generated token of the prefix (the
    /// PRM's confidence features, [`crate::prm::head::feature_vector`]).
    #[serde(default)]
    pub logprobs: Vec<f32>,
    /// Fraction of the N_MC continuations that reached the right answer.
    pub success: f64,
    pub correct: usize,
    pub n_mc: usize,
    /// A finished solution, labelled by the checker (1 or 0) rather than by
    /// continuations. The paper drops these from calibration; ponder trains
    /// the head on them too, so that it can rank finished answers, and
    /// leaves them out of the calibration report.
    #[serde(default)]
    pub final_answer: bool,
}

impl LabelRow {
    /// Math-Shepherd's hard label: 1 if any continuation succeeded.
    pub fn hard(&self) -> f64 {
        f64::from(u8::from(self.correct > 0))
    }
}

/// What a running sequence is for.
enum Role {
    /// Trajectory `j` of question `q`, extending one step at a time.
    Trajectory { q: usize, steps: Vec<String> },
    /// A continuation of prefix row `row` of question `q`.
    Rollout { q: usize, row: usize },
}

struct Pending {
    problem: Problem,
    rows: Vec<LabelRow>,
    seen: HashSet<String>,
    live: usize,
}

fn step_stop(cfg: &LabelConfig) -> StopCriteria {
    StopCriteria {
        max_tokens: cfg.max_step_tokens,
        stop: vec![STEP_DELIMITER.to_string()],
        eos: EosPolicy::Stop,
    }
}

fn rollout_stop(cfg: &LabelConfig, used: usize) -> StopCriteria {
    StopCriteria {
        max_tokens: cfg.max_tokens.saturating_sub(used).max(1),
        stop: Vec::new(),
        eos: EosPolicy::Stop,
    }
}

pub(crate) fn qhash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Labels for `problems`, decoded together (all their trajectories and
/// continuations share the engine's batched steps).
pub fn label_batch(
    engine: &Engine,
    problems: &[Problem],
    cfg: &LabelConfig,
) -> anyhow::Result<Vec<LabelRow>> {
    let mut pending: Vec<Pending> = Vec::new();
    let mut seqs: Vec<(Role, Sequence)> = Vec::new();
    for (q, p) in problems.iter().enumerate() {
        pending.push(start_question(engine, q, p, cfg, &mut seqs)?);
    }
    while seqs.iter().any(|(_, s)| s.needs_work()) {
        let mut live: Vec<&mut Sequence> =
            seqs.iter_mut().map(|(_, s)| s).filter(|s| s.needs_work()).collect();
        engine.step(&mut live)?;
        drop(live);
        let mut spawned = Vec::new();
        let mut i = 0;
        while i < seqs.len() {
            let (role, seq) = &mut seqs[i];
            if seq.needs_work() {
                i += 1;
                continue;
            }
            match role {
                Role::Rollout { q, row } => {
                    let ok = task::is_correct(seq.text(), pending[*q].problem.answer);
                    let r = &mut pending[*q].rows[*row];
                    r.correct += usize::from(ok);
                    r.n_mc += 1;
                    pending[*q].live -= 1;
                    seqs.swap_remove(i);
                }
                Role::Trajectory { q, steps } => {
                    let q = *q;
                    let step = seq.run_text().to_string();
                    let more = seq.finish() == Some(FinishReason::Stop { index: 0 })
                        && !step.contains("The answer is")
                        && steps.len() < cfg.max_prefix;
                    if !more {
                        let st = &mut pending[q];
                        let mut all = steps.clone();
                        all.push(step);
                        if st.seen.insert(format!("final:{}", seq.text())) {
                            let ok = task::is_correct(seq.text(), st.problem.answer);
                            let mut r = row(&st.problem, all.len(), all, seq);
                            r.correct = usize::from(ok);
                            r.final_answer = true;
                            st.rows.push(r);
                        }
                        st.live -= 1;
                        seqs.swap_remove(i);
                        continue;
                    }
                    steps.push(step);
                    let key = steps.join(STEP_DELIMITER);
                    let st = &mut pending[q];
                    if st.seen.insert(key) {
                        let k = steps.len();
                        let idx = st.rows.len();
                        st.rows.push(row(&st.problem, k, steps.clone(), seq));
                        let seeds: Vec<u64> = (0..cfg.n_mc as u64)
                            .map(|m| child_seed(qhash(&st.problem.id) ^ (idx as u64) << 20, m))
                            .collect();
                        for mut r in engine.fork(seq, &seeds)? {
                            r.resume(rollout_stop(cfg, seq.generated().len()));
                            spawned.push((Role::Rollout { q, row: idx }, r));
                        }
                        st.live += cfg.n_mc;
                    }
                    seq.resume(step_stop(cfg));
                    i += 1;
                }
            }
        }
        seqs.extend(spawned);
    }
    debug_assert!(pending.iter().all(|p| p.live == 0));
    Ok(pending.into_iter().flat_map(|p| p.rows).map(with_success).collect())
}

/// A row's success label: the share of its rollouts that reached the right
/// answer, or for a finished solution whether it is right.
pub(crate) fn with_success(mut r: LabelRow) -> LabelRow {
    r.success = if r.final_answer { r.correct as f64 } else { r.correct as f64 / r.n_mc.max(1) as f64 };
    r
}

/// Prefills question `q`'s prompt and pushes its first sequences: `n_mc`
/// rollouts from the empty prefix and `n_val` trajectories that will be
/// labelled step by step.
fn start_question(
    engine: &Engine,
    q: usize,
    p: &Problem,
    cfg: &LabelConfig,
    seqs: &mut Vec<(Role, Sequence)>,
) -> anyhow::Result<Pending> {
    let tok = engine.tokenizer();
    let text = tok.apply_chat_template(&[ChatMessage::new("user", p.question.clone())])?;
    let prompt = tok.encode(&text, AddSpecial::No)?;
    let opts = SeqOptions {
        sampling: SamplingParams { temperature: cfg.temperature, top_p: 1.0, top_k: 0, seed: cfg.seed },
        stop: step_stop(cfg),
        // The chosen tokens' logprobs are PRM features.
        logprobs: Logprobs::Top(0),
        capture: HiddenCapture::AtStop,
    };
    let mut root = engine.start(prompt, opts)?;
    while root.cached_len() < root.prompt_len() {
        engine.step(&mut [&mut root])?;
    }
    let base = cfg.seed ^ qhash(&p.id);
    let mut state = Pending { problem: p.clone(), rows: Vec::new(), seen: HashSet::new(), live: 0 };
    // The empty prefix: continuations straight from the prompt.
    state.seen.insert(String::new());
    state.rows.push(row(p, 0, Vec::new(), &root));
    let roll_seeds: Vec<u64> = (0..cfg.n_mc as u64).map(|m| child_seed(base ^ 0x5EED, m)).collect();
    for mut r in engine.fork(&mut root, &roll_seeds)? {
        r.resume(rollout_stop(cfg, 0));
        seqs.push((Role::Rollout { q, row: 0 }, r));
    }
    let traj_seeds: Vec<u64> = (0..cfg.n_val as u64).map(|j| child_seed(base, j)).collect();
    for t in engine.fork(&mut root, &traj_seeds)? {
        seqs.push((Role::Trajectory { q, steps: Vec::new() }, t));
    }
    state.live = cfg.n_mc + cfg.n_val;
    Ok(state)
}

fn row(p: &Problem, k: usize, prefix: Vec<String>, seq: &Sequence) -> LabelRow {
    LabelRow {
        question_id: p.id.clone(),
        split: split_of(&p.id),
        level: p.level,
        k,
        prefix,
        tokens: seq.tokens().to_vec(),
        prompt_len: seq.prompt_len(),
        logprobs: seq.logprobs().iter().map(|l| l.logprob).collect(),
        success: 0.0,
        correct: 0,
        n_mc: 0,
        final_answer: false,
    }
}

pub(super) fn split_of(id: &str) -> Split {
    match id.split('-').next() {
        Some("train") => Split::Train,
        Some("calib") => Split::Calib,
        _ => Split::Test,
    }
}

/// Reads the rows already in `path` (a missing file is empty).
pub fn read(path: &Path) -> anyhow::Result<Vec<LabelRow>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// Where the policy generates the labels' trajectories and continuations.
pub enum Source<'a> {
    /// This process's engine, in batched steps.
    Local(&'a Engine),
    /// The model's remote engine, over `/v1/completions`.
    Remote(&'a super::remote_labels::RemoteLabeler),
}

impl Source<'_> {
    fn label_batch(&self, problems: &[Problem], cfg: &LabelConfig) -> anyhow::Result<Vec<LabelRow>> {
        match self {
            Source::Local(engine) => label_batch(engine, problems, cfg),
            Source::Remote(labeler) => labeler.label_batch(problems, cfg),
        }
    }
}

/// Labels every problem not yet in `path`, appending per batch of
/// `concurrent` questions. Returns all rows in the file.
pub fn collect(
    source: &Source<'_>,
    problems: &[Problem],
    cfg: &LabelConfig,
    path: &Path,
    concurrent: usize,
) -> anyhow::Result<Vec<LabelRow>> {
    let done: HashSet<String> = read(path)?.into_iter().map(|r| r.question_id).collect();
    let todo: Vec<Problem> = problems.iter().filter(|p| !done.contains(&p.id)).cloned().collect();
    let bar = indicatif::ProgressBar::new(problems.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} questions ETA {eta} {msg}",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar.set_message(path.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default());
    bar.inc(done.len() as u64);
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    for chunk in todo.chunks(concurrent.max(1)) {
        let rows = source.label_batch(chunk, cfg)?;
        let mut buf = String::new();
        for r in &rows {
            buf.push_str(&serde_json::to_string(r)?);
            buf.push('\n');
        }
        file.write_all(buf.as_bytes())?;
        file.flush()?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let by_order: HashMap<String, usize> =
        problems.iter().enumerate().map(|(i, p)| (p.id.clone(), i)).collect();
    let mut rows: Vec<LabelRow> =
        read(path)?.into_iter().filter(|r| by_order.contains_key(&r.question_id)).collect();
    rows.sort_by_key(|r| (by_order[&r.question_id], r.k));
    Ok(rows)
}
