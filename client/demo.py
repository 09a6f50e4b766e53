"""`make demo`: the whole loop on the embedded default, with a tiny model built locally.

Starts a registry (SQLite + blob folder) in a temporary folder, builds a tiny Llama-style model, trains a
LoRA adapter with peft on a synthetic task, pushes it with its eval score, pulls, verifies and applies it,
checks the merged model against the PEFT model, and shows that a different base is refused.
Needs the ``torch`` and ``dev`` extras (transformers, peft). Run: ``python -m deltareg.client.demo``.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

VOCAB, SEQ, SHIFT = 64, 16, 3


PUSHER, REVIEWER = "alice", "bob"
DEMO_ACTOR = "DEMO_ACTOR"  # whose token a command of the demo runs with (shown next to it)


def step(number: int, text: str) -> None:
    print(f"\n[{number}] {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(data_dir: Path) -> Iterator[str]:
    """A real registry process on loopback, stopped on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (data_dir.parent / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deltareg.registry.serve", "--port", str(port), "--data-dir", str(data_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_up(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()


def wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the registry exited with code {proc.returncode}; see server.log")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the registry did not come up at {url} within {timeout:.0f}s")


def build_base(folder: Path, seed: int) -> Any:
    """A tiny random-init Llama saved as safetensors (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model: Any = LlamaForCausalLM(config)
    model.eval()
    model.save_pretrained(folder)
    return model


def batch(generator: Any, size: int) -> tuple[Any, Any]:
    """The synthetic task: after token t comes (t + SHIFT) mod VOCAB."""
    import torch

    start = torch.randint(0, VOCAB, (size, 1), generator=generator)
    tokens = (start + SHIFT * torch.arange(SEQ)) % VOCAB
    return tokens, tokens.clone()


def logits(model: Any, tokens: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=tokens).logits


def accuracy(model: Any, tokens: Any) -> float:
    import torch

    with torch.no_grad():
        predicted = model(input_ids=tokens).logits[:, :-1].argmax(-1)
    return float((predicted == tokens[:, 1:]).float().mean())


def train_lora(base: Any, steps: int = 120) -> tuple[Any, float, float]:
    import torch
    from peft import LoraConfig, get_peft_model

    generator = torch.Generator().manual_seed(1)
    held_out, _ = batch(generator, 256)
    before = accuracy(base, held_out)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        tokens, labels = batch(generator, 32)
        loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model, before, accuracy(model, held_out)


def train_full(base_folder: Path, steps: int = 60) -> tuple[Any, float]:
    """A full fine-tune of the saved base on the same task: every weight trained."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base_folder)
    generator = torch.Generator().manual_seed(2)
    held_out, _ = batch(generator, 256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        tokens, labels = batch(generator, 32)
        model(input_ids=tokens, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model, accuracy(model, held_out)


def dense_round_trip(work: Path, env: dict[str, str]) -> bool:
    """Full fine-tune, diff, push, apply with the recorded result expected: True when the merged model is
    the fine-tuned one, bit for bit (same fingerprint)."""
    tuned, tuned_accuracy = train_full(work / "base")
    tuned.save_pretrained(work / "tuned")
    print(f"  full fine-tune: held-out accuracy {tuned_accuracy:.3f}")
    tuned_hash = cli("hash", str(work / "tuned"), env=env).stdout.strip()
    cli("diff", str(work / "base"), str(work / "tuned"), "-o", str(work / "dense"), env=env)
    cli("push", str(work / "dense"), "demo/shift-full", "--base", str(work / "base"), env=env)
    applied = cli(
        "apply", "demo/shift-full", "--base", str(work / "base"), "-o", str(work / "merged-full"),
        "--expect", "recorded", env=env,
    )  # fmt: skip
    same = applied.returncode == 0 and f"fingerprint: {tuned_hash}" in applied.stdout
    print(f"  merged model is the fine-tuned model, bit for bit: {same}")
    return same


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("deltareg")
    done = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, check=False)
    shown = done.stdout.strip() or done.stderr.strip()
    who = env.get(DEMO_ACTOR, PUSHER)
    shown_who = "" if who == PUSHER else f"   (with {who}'s token)"
    print(f"  $ deltareg {shlex.join(args)}   (exit {done.returncode}){shown_who}")
    print("\n".join("    " + line for line in shown.splitlines()))
    return done


def quiet_libraries() -> None:
    """Keep the demo's output to its own steps: no progress bars or deprecation chatter from libraries."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def main() -> int:
    quiet_libraries()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from deltareg.client import Registry
    from deltareg.client.errors import BaseMismatch

    ok = True
    work = Path(tempfile.mkdtemp(prefix="deltareg-demo-"))
    # The demo's own cache and CLI credentials: nothing is read from or written to your home folder.
    os.environ["DELTAREG_CACHE_DIR"] = str(work / "cache")
    os.environ["DELTAREG_CONFIG_DIR"] = str(work / "config")
    os.environ.pop("DELTAREG_TOKEN", None)
    print(f"deltareg demo in {work}")
    step(1, "start a registry on the embedded default (SQLite + blob folder); make tokens for alice and bob")
    with running_server(work / "registry") as url:
        os.environ["DELTAREG_URL"] = url
        print(f"  registry at {url}")
        env = people_tokens(url)
        os.environ["DELTAREG_TOKEN"] = env["DELTAREG_TOKEN"]  # this process acts as alice too
        step(2, "build a tiny Llama-style base model locally (random init, no download)")
        base = build_base(work / "base", seed=0)
        print(f"  {sum(p.numel() for p in base.parameters()):,} parameters -> {work / 'base'}")
        cli("hash", str(work / "base"), env=env)

        step(3, f"train a LoRA adapter with peft: learn 'next token = token + {SHIFT}'")
        peft_model, before, after = train_lora(base)
        peft_model.save_pretrained(work / "adapter")
        print(f"  held-out accuracy: {before:.3f} before, {after:.3f} after training")

        step(4, "push the adapter against its base model, with its eval score")
        with Registry(url) as reg:
            pushed = reg.push(
                work / "adapter",
                "demo/shift-bot",
                base=work / "base",
                evals={"accuracy": after},
                metadata={"task": f"shift-{SHIFT}"},
            )
            print(f"  pushed {pushed.version.ref} {pushed.version.digest}")
            again = reg.push(
                work / "adapter",
                "demo/shift-bot",
                base=work / "base",
                evals={"accuracy": after},
                metadata={"task": f"shift-{SHIFT}"},
            )
            print(f"  pushed again: same version {again.version.ref}, {again.uploaded_blobs} blobs uploaded")
        cli("list", "demo", env=env)
        cli("show", "demo/shift-bot:1", env=env)

        step(5, "pull (download + verify every digest), verify, and apply file to file")
        pulled_path = cli("pull", "demo/shift-bot:1", env=env).stdout.strip()
        cli("verify", "demo/shift-bot:1", "--base", str(work / "base"), env=env)
        cli("apply", "demo/shift-bot:1", "--base", str(work / "base"), "-o", str(work / "merged"), env=env)

        step(6, "the merged model's outputs equal the PEFT model's outputs")
        tokens, _ = batch(torch.Generator().manual_seed(7), 64)
        merged: Any = AutoModelForCausalLM.from_pretrained(work / "merged")
        merged.eval()
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "base"), pulled_path)
        expected = logits(peft_model, tokens)
        diffs = {
            "merged model": logits(merged, tokens),
            "pulled folder in PeftModel": logits(reloaded.eval(), tokens),
        }
        for label, got in diffs.items():
            diff = (got - expected).abs().max().item()
            same = bool((got.argmax(-1) == expected.argmax(-1)).all())
            print(f"  {label}: max |logits difference| = {diff:.2e}; identical predictions: {same}")
            ok = ok and diff < 1e-4 and same
        print(f"  merged model accuracy: {accuracy(merged, tokens):.3f}")

        step(7, "applying to a different base is refused, and nothing is written")
        build_base(work / "other-base", seed=1)
        cli(
            "apply",
            "demo/shift-bot:1",
            "--base",
            str(work / "other-base"),
            "-o",
            str(work / "wrong"),
            env=env,
        )
        other = build_base(work / "other-base-2", seed=1)
        pristine = {name: tensor.clone() for name, tensor in other.state_dict().items()}
        with Registry(url) as reg:
            try:
                reg.pull("demo/shift-bot:1").apply(other)
                print("  UNEXPECTED: the wrong base was accepted")
                ok = False
            except BaseMismatch as exc:
                untouched = all(torch.equal(pristine[n], t) for n, t in other.state_dict().items())
                print(f"  in memory too: {type(exc).__name__}; model untouched: {untouched}")
                ok = ok and untouched
        print(f"  output folder created: {(work / 'wrong').exists()}")
        ok = ok and not (work / "wrong").exists()

        step(8, "promote to production under a policy: a score threshold and a second person's approval")
        ok = promote_under_policy(env) and ok

        step(
            9, "a full fine-tune as a dense delta: diff, push (compression shown), apply checked bit for bit"
        )
        ok = dense_round_trip(work, env) and ok
    print(f"\ndemo {'succeeded' if ok else 'FAILED'}; files kept in {work}")
    return 0 if ok else 1


def people_tokens(url: str) -> dict[str, str]:
    """With the admin token the embedded server handed to this machine's CLI, make alice's token (push,
    promote) and bob's (promote: approvals). Returns alice's environment; bob's token is in REVIEWER_TOKEN."""
    from deltareg.client import Registry

    admin = {**os.environ, DEMO_ACTOR: "admin"}
    cli("token", "whoami", env=admin)
    with Registry(url) as registry:
        alice = registry.create_token(PUSHER, ["write", "promote"], namespaces=["demo"])["token"]
        bob = registry.create_token(REVIEWER, ["promote"], namespaces=["demo"])["token"]
    print(f"  created tokens {PUSHER} (write, promote on demo/*) and {REVIEWER} (promote on demo/*)")
    return {**os.environ, "DELTAREG_TOKEN": alice, "REVIEWER_TOKEN": bob}


def promote_under_policy(env: dict[str, str]) -> bool:
    """Set a policy (as admin), see a promotion refused with its failed rule, approve as someone else,
    promote, and check the audit log's hash chain. True when each step answered as expected."""
    repo, ref = "demo/shift-bot", "demo/shift-bot:1"
    reviewer = {**env, "DELTAREG_TOKEN": env["REVIEWER_TOKEN"], DEMO_ACTOR: REVIEWER}
    admin = {k: v for k, v in env.items() if k != "DELTAREG_TOKEN"} | {DEMO_ACTOR: "admin"}
    policy = cli(
        "policy", "set", repo, "--alias", "production", "--min", "accuracy=0.9", "--approvals", "1", env=admin
    )
    refused = cli("promote", ref, "--alias", "production", "--reason", "first release", env=env)
    approved = cli("approve", ref, "--alias", "production", env=reviewer)
    promoted = cli("promote", ref, "--alias", "production", "--reason", "first release", env=env)
    cli("audit", repo, env=env)
    verified = cli("audit", "verify", env=env)
    codes = [c.returncode for c in (policy, refused, approved, promoted, verified)]
    return codes == [0, 1, 0, 0, 0] and "0 of 1 approvals" in refused.stderr


if __name__ == "__main__":
    raise SystemExit(main())
