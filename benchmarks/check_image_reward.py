"""Check that ``opd_bench.rewards.image_reward.ImageReward`` scores exactly as the ``image-reward`` package.

The package does not import beside transformers 5, so it runs in a side virtual environment
(``--venv``, see docs/image_reward.md for how to build it). Steps:

1. in the side venv, the package's own ``ImageReward`` class (ViT-L + the published
   ``med_config.json``, full size) is built with a fixed seed, every float weight is perturbed
   with seeded noise (its init leaves biases at 0 and LayerNorms at 1, which would hide bugs),
   and its ``state_dict()`` is saved as ``ImageReward.pt``: the published checkpoint's format;
2. a small BERT WordPiece vocabulary is written offline as a tokenizer folder (no hub access);
3. PNG images of several sizes (down-, up- and no rescaling, non-square crops) and prompts
   (case, punctuation, accents, unknown words, "[ENC]", longer than 35 tokens) are written;
4. the package scores every pair with ``ImageReward.score(prompt, PIL image)`` (side venv,
   tokenizer found as ./bert-base-uncased, fully offline); this project's reward scores the same
   pairs one by one and in one batch; both are printed with the max abs difference.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/check_image_reward.py --venv /tmp/ir-venv --work /tmp/ir-check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# BLIP's configs/med_config.json, which THUDM/ImageReward publishes as med_config.json.
MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524,
    "encoder_width": 768, "add_cross_attention": True,
}
WORDS = ("a an the of on in with and at by photo portrait painting cat dog red blue green yellow small big "
         "old young woman man city street night sky sun tree house car cafe oil style high detailed "
         "render light dark under over next to wearing hat two three sitting standing").split()
PROMPTS = [
    "a photo of a cat",
    "A RED car on the street, at night!",
    "an oil painting of an old woman wearing a hat, high detailed, 8k, trending",
    "two dogs sitting under a tree next to a small house in the city with a blue sky and a yellow sun "
    "and a green car and a red car and an old man standing in the street at night, detailed render",
    "café [ENC] portrait of a young man",
    "photographs of zebras",
]
SIZES = [(256, 256), (256, 256), (256, 256), (512, 384), (200, 300), (224, 224)]  # (width, height)

SIDE_SCRIPT = r'''
import json, sys, torch
import ImageReward as RM
from importlib.metadata import version
from PIL import Image
mode, work = sys.argv[1], sys.argv[2]
if mode == "make":
    from ImageReward.ImageReward import ImageReward
    seed = int(sys.argv[3])
    torch.manual_seed(seed)
    model = ImageReward(med_config=work + "/model/med_config.json", device="cpu")
    g = torch.Generator().manual_seed(seed + 1)
    state = model.state_dict()
    for key, value in state.items():
        if value.is_floating_point():
            value.add_(torch.randn(value.shape, generator=g) * (0.05 if key.startswith("mlp.") else 0.02))
    torch.save(state, work + "/model/ImageReward.pt")
else:
    model = RM.load(work + "/model/ImageReward.pt", device="cpu", med_config=work + "/model/med_config.json")
    pairs = json.load(open(work + "/pairs.json"))
    with torch.no_grad():
        scores = [model.score(p["prompt"], Image.open(work + "/" + p["image"])) for p in pairs]
    versions = {n: version(n) for n in ("image-reward", "torch", "transformers", "timm", "pillow")}
    json.dump({"scores": scores, "versions": versions}, open(work + "/package_scores.json", "w"))
'''


def write_tokenizer(folder: Path) -> None:
    """bert-base-uncased's special tokens and layout, with a small vocabulary (prompts are mostly
    in-vocabulary; some words need WordPiece pieces or fall back to [UNK])."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = (["[PAD]"] + [f"[unused{i}]" for i in range(5)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
             + list(".,!?-'") + [str(d) for d in range(10)] + letters + ["##" + c for c in letters + list("0123456789")]
             + WORDS + ["##s", "##graph", "##ing", "trend", "zebra"])
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")


def write_images(work: Path, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    names = []
    for i, (w, h) in enumerate(SIZES):
        # Smooth colour fields plus noise: resampling has real work to do.
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        base = np.stack([np.sin(6 * xx * rng.uniform(0.5, 2) + k) * np.cos(5 * yy * rng.uniform(0.5, 2)) for k in range(3)], -1)
        array = np.clip(127.5 + 90 * base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        names.append(f"image{i}.png")
        Image.fromarray(array).save(work / names[-1])
    return names


def run_side(venv: Path, work: Path, *args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run([str(venv / "bin" / "python"), str(work / "side.py"), *args], cwd=work, env=env,
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"side venv failed ({' '.join(args[:1])}):\n{result.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=Path("/tmp/ir-venv"), help="venv with image-reward installed")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ir-check"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = args.work
    (work / "model").mkdir(parents=True, exist_ok=True)
    (work / "side.py").write_text(SIDE_SCRIPT)
    (work / "model" / "med_config.json").write_text(json.dumps(MED_CONFIG, indent=2))
    write_tokenizer(work / "bert-base-uncased")  # the package loads "bert-base-uncased": this folder in its cwd
    images = write_images(work, args.seed)
    pairs = [{"image": image, "prompt": prompt} for image, prompt in zip(images, PROMPTS)]
    (work / "pairs.json").write_text(json.dumps(pairs, indent=1))

    if not (work / "model" / "ImageReward.pt").exists():
        run_side(args.venv, work, "make", str(work), str(args.seed))
    run_side(args.venv, work, "score", str(work))
    package = json.loads((work / "package_scores.json").read_text())

    from opd_bench.rewards import get

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(Image.open(work / name).convert("RGB"))).permute(2, 0, 1).float() / 255

    reward = get("imagereward", model_path=str(work / "model"), tokenizer_path=str(work / "bert-base-uncased"),
                 batch_size=8)
    ours = [reward(tensor(p["image"])[None], [p["prompt"]], [{}]).scores.item() for p in pairs]
    same_size = [i for i, size in enumerate(SIZES) if size == SIZES[0]]
    batched = reward(torch.stack([tensor(pairs[i]["image"]) for i in same_size]),
                     [pairs[i]["prompt"] for i in same_size], [{}] * len(same_size)).scores.tolist()

    print(f"{'image':>8} {'size':>8}  {'package':>12} {'ours':>12} {'abs diff':>10}  prompt")
    for p, size, a, b in zip(pairs, SIZES, package["scores"], ours):
        print(f"{p['image'][:-4]:>8} {size[0]}x{size[1]:<4}  {a:12.8f} {b:12.8f} {abs(a - b):10.2e}  {p['prompt'][:50]!r}")
    one = max(abs(a - b) for a, b in zip(package["scores"], ours))
    many = max(abs(package["scores"][i] - s) for i, s in zip(same_size, batched))
    print(f"max abs diff, one image per call: {one:.3e}; batched ({len(same_size)} images): {many:.3e}")
    print(f"package side: {package['versions']}")
    import transformers

    print(f"ours: torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    print(f"{datetime.date.today()} {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}")


if __name__ == "__main__":
    main()
