//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::Device;
use ponder::engine::{
    Engine, EngineOptions, EosPolicy, HiddenCapture, Logprobs, SamplingParams, SeqOptions, Sequence,
    StopCriteria,
};
use ponder::model::WeightFormat;
use ponder::tokenizer::{AddSpecial, ChatMessage};

/// The default model, fetched by `make models` (which `make test` runs first).
pub fn smollm_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `make models` (make test does it first)", p.display());
    p
}

/// SmolLM2 with the default weight format, loaded once per test binary.
pub fn smollm() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        Engine::load(&smollm_path(), WeightFormat::Auto, &Device::Cpu, EngineOptions::default())
            .expect("SmolLM2 loads")
    })
}

pub fn chat_prompt(engine: &Engine, user: &str) -> Vec<u32> {
    let tok = engine.tokenizer();
    let text = tok.apply_chat_template(&[ChatMessage::new("user", user)]).expect("template renders");
    tok.encode(&text, AddSpecial::No).expect("prompt encodes")
}

pub fn options(temperature: f32, seed: u64, max_tokens: usize) -> SeqOptions {
    SeqOptions {
        sampling: SamplingParams::sampled(temperature, seed),
        stop: StopCriteria { max_tokens, stop: Vec::new(), eos: EosPolicy::Stop },
        logprobs: Logprobs::None,
        capture: HiddenCapture::Never,
    }
}

/// Steps the given sequences together until none is running.
pub fn run_all(engine: &Engine, seqs: &mut [Sequence]) {
    while seqs.iter().any(|s| s.needs_work()) {
        let mut live: Vec<&mut Sequence> = seqs.iter_mut().filter(|s| s.needs_work()).collect();
        engine.step(&mut live).expect("step succeeds");
    }
}

/// Feeds a sequence's prompt completely.
pub fn prefill(engine: &Engine, seq: &mut Sequence) {
    while seq.cached_len() < seq.prompt_len() {
        engine.step(&mut [seq]).expect("prefill succeeds");
    }
}

// ---------------------------------------------------------------- servers

use ponder::config::Config;

/// A server on an ephemeral loopback port, on its own runtime thread.
pub struct TestServer {
    pub base: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    /// Starts `config` (its port is ignored) and waits until /health is 200.
    pub fn start(config: Config) -> Self {
        Self::start_with(config, ponder::worker::WorkerOptions::default())
    }

    /// [`start`](Self::start) with worker options (a fault hook).
    pub fn start_with(config: Config, options: ponder::worker::WorkerOptions) -> Self {
        let server = Self::start_unchecked(config, options);
        server.wait_healthy();
        server
    }

    /// Starts the server without waiting for /health to say 200 (a test of
    /// an unhealthy server).
    pub fn start_unchecked(mut config: Config, options: ponder::worker::WorkerOptions) -> Self {
        config.server.host = "127.0.0.1".into();
        config.server.port = 0;
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                ponder::server::run_with(listener, config, options, async move {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        Self { base: format!("http://{addr}"), shutdown: Some(stop_tx), thread: Some(thread) }
    }

    fn wait_healthy(&self) {
        for _ in 0..600 {
            if let Ok(r) = blocking_get(&format!("{}/health", self.base))
                && r.0 == 200
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("server at {} never became healthy", self.base);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Signals shutdown (as SIGTERM would) and waits for `run` to return.
    pub fn stop(mut self) {
        self.shutdown.take().map(|s| s.send(()));
        self.thread.take().map(|t| t.join());
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.take().map(|s| s.send(()));
    }
}

/// (status, body) of a GET, without an async runtime.
pub fn blocking_get(url: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(host)?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// The default config serving SmolLM2 from its absolute path.
pub fn smollm_config() -> Config {
    let mut c = Config::default();
    c.models[0].path = smollm_path();
    c
}

/// A config serving one model, `id`, from the remote engine at `url`
/// (ending in /v1) under the engine's name `engine_model`, with SmolLM2's
/// tokenizer.
pub fn remote_config(id: &str, url: &str, engine_model: &str, timeout_secs: u64) -> Config {
    let mut c = Config::default();
    c.models.truncate(1);
    let m = &mut c.models[0];
    m.id = id.into();
    m.path = PathBuf::new();
    m.fetch = None;
    m.tokenizer = Some(smollm_path());
    m.backend = ponder::config::BackendConfig::Openai(ponder::config::RemoteEngine {
        url: url.into(),
        model: engine_model.into(),
        api_key_env: None,
        timeout_secs,
        server: Default::default(),
        max_n: None,
        api_key: None,
    });
    c
}

/// One server with the default config, shared by every test of a binary.
pub fn shared_server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| TestServer::start(smollm_config()))
}

pub const MODEL: &str = "smollm2-135m-instruct";

/// The `data:` payloads of an SSE body, `[DONE]` included.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

/// The value of a metric line (name with labels, as printed) in /metrics text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

// ---------------------------------------------------------------- a tiny model PRM

/// Hidden width and layers of the tiny PRM.
pub const H: usize = 32;
const LAYERS: usize = 2;

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use ponder::prm::model_prm::STEP_TOKEN;
use tokenizers::AddedToken;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::bpe::BPE;

/// A character-level tokenizer with ChatML specials and `<extra_0>` (id 2).
pub fn write_tokenizer(dir: &Path) -> usize {
    let specials = ["<|im_start|>", "<|im_end|>", STEP_TOKEN];
    let chars: Vec<String> =
        ['\n', ' '].into_iter().chain((b'!'..=b'~').map(char::from)).map(String::from).collect();
    let vocab: ahash::AHashMap<String, u32> =
        specials.iter().map(|s| s.to_string()).chain(chars).enumerate().map(|(i, s)| (s, i as u32)).collect();
    let n = vocab.len();
    let mut tok = tokenizers::Tokenizer::new(BPE::builder().vocab_and_merges(vocab, vec![]).build().unwrap());
    tok.with_decoder(Some(Fuse::new()));
    tok.add_special_tokens(specials.iter().map(|s| AddedToken::from(*s, true)).collect::<Vec<_>>()).unwrap();
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    let template = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}";
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"chat_template": template, "eos_token": "<|im_end|>"}).to_string(),
    )
    .unwrap();
    n
}

/// A tiny random Qwen2ForProcessRewardModel checkpoint with the real tensor names.
pub fn write_prm(dir: &Path) {
    let vocab = write_tokenizer(dir);
    let dev = Device::Cpu;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let mut rand = |name: &str, shape: &[usize], scale: f64, offset: f64| {
        t.insert(
            name.into(),
            ((Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * scale).unwrap() + offset).unwrap(),
        );
    };
    let s = 1.0 / (H as f64).sqrt();
    rand("model.embed_tokens.weight", &[vocab, H], 0.5, 0.0);
    rand("model.norm.weight", &[H], 0.1, 1.0);
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        rand(&format!("{p}.input_layernorm.weight"), &[H], 0.1, 1.0);
        rand(&format!("{p}.post_attention_layernorm.weight"), &[H], 0.1, 1.0);
        for (n, rows) in [("q_proj", H), ("k_proj", H / 2), ("v_proj", H / 2)] {
            rand(&format!("{p}.self_attn.{n}.weight"), &[rows, H], s, 0.0);
            rand(&format!("{p}.self_attn.{n}.bias"), &[rows], 0.1, 0.0);
        }
        rand(&format!("{p}.self_attn.o_proj.weight"), &[H, H], s, 0.0);
        rand(&format!("{p}.mlp.gate_proj.weight"), &[2 * H, H], s, 0.0);
        rand(&format!("{p}.mlp.up_proj.weight"), &[2 * H, H], s, 0.0);
        rand(&format!("{p}.mlp.down_proj.weight"), &[H, 2 * H], s, 0.0);
    }
    rand("score.0.weight", &[H, H], s, 0.0);
    rand("score.0.bias", &[H], 0.1, 0.0);
    rand("score.2.weight", &[2, H], 1.0, 0.0);
    rand("score.2.bias", &[2], 0.1, 0.0);
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let cfg = serde_json::json!({
        "architectures": ["Qwen2ForProcessRewardModel"], "model_type": "qwen2",
        "hidden_size": H, "intermediate_size": 2 * H, "num_hidden_layers": LAYERS,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "sliding_window": 512, "max_window_layers": LAYERS, "use_sliding_window": false,
        "tie_word_embeddings": false, "hidden_act": "silu",
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

// ---------------------------------------------------------------- tools beside ponder

/// A program the tests run beside ponder (Prometheus, llama.cpp's server,
/// kubernetes-validate), installed by `scripts/install_test_tools.sh`,
/// which `make test` runs first: on PATH, or in the tools venv.
pub fn tool(name: &str) -> PathBuf {
    let venv = std::env::var_os("PONDER_TOOLS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ponder/tools")))
        .map(|t| t.join("venv/bin"));
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain(venv).map(|dir| dir.join(name)).find(|p| p.is_file()).unwrap_or_else(
        || panic!("`{name}` is not installed: run scripts/install_test_tools.sh (make test does)"),
    )
}

/// A loopback port nobody listens on now, for a server started by another
/// program.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed when the test ends, however it ends.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the `ponder` binary with one compute thread: (success, stdout, stderr).
pub fn ponder_cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ponder"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}
