//! Monte-Carlo labels (as in Park et al. 2025): for each question, N_val trajectories
//! generated step by step; for every prefix (the empty one included, those
//! holding the final answer dropped, at most `max_prefix` steps), N_MC
//! continuations, and the fraction that reaches the right answer. One JSONL
//! row per distinct prefix, appended per question, so a run can resume.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arith::task::{self, Problem, STEP_DELIMITER, Split};
use crate::engine::{
    Engine, EosPolicy, FinishReason, HiddenCapture, Logprobs, SamplingParams, SeqOptions, Sequence,
    StopCriteria, child_seed,
};
use crate::tokenizer::{AddSpecial, ChatMessage};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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
        sampling: SamplingParams::sampled(cfg.temperature, cfg.seed),
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

/// What a labels file was drawn with, kept beside it
/// (`labels_<split>.settings.json`) so that a run resuming it checks that
/// its rows answer the same questions with the same settings: a question's
/// id names its place in the draw, not its text, so another `--per-level`
/// gives an id another question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LabelSettings {
    config: LabelConfig,
    /// Question id → question text.
    questions: BTreeMap<String, String>,
}

fn settings_path(labels: &Path) -> PathBuf {
    let stem = labels.file_stem().map_or_else(|| "labels".into(), |s| s.to_string_lossy().to_string());
    labels.with_file_name(format!("{stem}.settings.json"))
}

/// Refuses to resume `path` with other settings or other questions under
/// its ids, then records this run's (its questions added).
fn check_and_record_settings(path: &Path, problems: &[Problem], cfg: &LabelConfig) -> anyhow::Result<()> {
    let sidecar = settings_path(path);
    let start_over = || {
        format!(
            "label into another directory (--labels) or remove {} and {}",
            path.display(),
            sidecar.display()
        )
    };
    let mut questions = BTreeMap::new();
    if sidecar.exists() {
        let text =
            std::fs::read_to_string(&sidecar).map_err(|e| anyhow::anyhow!("{}: {e}", sidecar.display()))?;
        let old: LabelSettings =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", sidecar.display()))?;
        let (was, now) = (serde_json::to_value(old.config)?, serde_json::to_value(cfg)?);
        if let Some((field, v)) = now.as_object().into_iter().flatten().find(|(k, v)| was.get(*k) != Some(*v))
        {
            anyhow::bail!(
                "{} was labelled with {field} {}, this run asks for {v}: {}",
                path.display(),
                was.get(field).unwrap_or(&serde_json::Value::Null),
                start_over()
            );
        }
        for p in problems {
            if let Some(q) = old.questions.get(&p.id).filter(|q| **q != p.question) {
                anyhow::bail!(
                    "{} holds question {} as {q:?}, this run's {} is {:?} (another --per-level draws other \
                     questions under the same ids): {}",
                    path.display(),
                    p.id,
                    p.id,
                    p.question,
                    start_over()
                );
            }
        }
        questions = old.questions;
    } else if path.exists() && std::fs::metadata(path)?.len() > 0 {
        // Labels from before settings were kept: only what each row records
        // can be checked.
        let levels: HashMap<&str, u8> = problems.iter().map(|p| (p.id.as_str(), p.level)).collect();
        for r in read(path)? {
            let level = levels.get(r.question_id.as_str());
            anyhow::ensure!(
                (r.final_answer || r.n_mc == cfg.n_mc) && level.is_none_or(|&l| l == r.level),
                "{} holds a row for {} with N_MC {} at level {}, this run asks for N_MC {}{}: {}",
                path.display(),
                r.question_id,
                r.n_mc,
                r.level,
                cfg.n_mc,
                level.map(|l| format!(" and has it at level {l}")).unwrap_or_default(),
                start_over()
            );
        }
    }
    questions.extend(problems.iter().map(|p| (p.id.clone(), p.question.clone())));
    let settings = LabelSettings { config: *cfg, questions };
    std::fs::write(&sidecar, serde_json::to_string_pretty(&settings)? + "\n")
        .map_err(|e| anyhow::anyhow!("{}: {e}", sidecar.display()))?;
    Ok(())
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
    check_and_record_settings(path, problems, cfg)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(p: &Problem, n_mc: usize) -> LabelRow {
        LabelRow {
            question_id: p.id.clone(),
            split: Split::Calib,
            level: p.level,
            k: 0,
            prefix: vec![],
            tokens: vec![1, 2],
            prompt_len: 2,
            logprobs: vec![],
            success: 0.5,
            correct: n_mc / 2,
            n_mc,
            final_answer: false,
        }
    }

    #[test]
    fn resuming_labels_with_other_questions_under_the_same_ids_or_other_settings_is_refused() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("labels_calib.jsonl");
        let cfg = LabelConfig::default();
        let few = task::generate(Split::Calib, 2).expect("questions");
        check_and_record_settings(&path, &few, &cfg).expect("a first run records its settings");
        check_and_record_settings(&path, &few[..3], &cfg).expect("the same questions resume");
        let sidecar = dir.path().join("labels_calib.settings.json");
        assert!(sidecar.exists());

        // Levels 2..6 draw other questions under the same ids.
        let more = task::generate(Split::Calib, 3).expect("questions");
        let moved = more.iter().find(|p| few.iter().any(|f| f.id == p.id && f.question != p.question));
        let moved = moved.expect("another --per-level moves some ids to other questions");
        let e = check_and_record_settings(&path, &more, &cfg).expect_err("other questions").to_string();
        assert!(e.contains(&moved.id) && e.contains(&moved.question) && e.contains("--per-level"), "{e}");

        let e = check_and_record_settings(&path, &few, &LabelConfig { n_mc: 16, ..cfg })
            .expect_err("other settings")
            .to_string();
        assert!(e.contains("n_mc 8, this run asks for 16") && e.contains("--labels"), "{e}");
    }

    #[test]
    fn labels_without_a_settings_file_are_checked_by_what_each_row_records() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("labels_calib.jsonl");
        let few = task::generate(Split::Calib, 1).expect("questions");
        let line = serde_json::to_string(&row(&few[0], 8)).expect("a row serialises") + "\n";
        std::fs::write(&path, line).expect("written");
        let cfg = LabelConfig::default();
        let e = check_and_record_settings(&path, &few, &LabelConfig { n_mc: 16, ..cfg })
            .expect_err("N_MC differs")
            .to_string();
        assert!(e.contains("N_MC 8") && e.contains("N_MC 16"), "{e}");
        check_and_record_settings(&path, &few, &cfg).expect("matching rows resume");
        assert!(
            dir.path().join("labels_calib.settings.json").exists(),
            "and the settings are kept from now on"
        );
    }
}
