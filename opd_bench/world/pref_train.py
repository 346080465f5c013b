"""Training of the tiny preference model (the tiny world's PickScore).

``pretrain_pref(out_dir, seed=0, num_pairs=20000, ...)``:

1. pair data (:mod:`opd_bench.world.pref_data`): ``images_per_prompt`` images for each pref
   train prompt (the renderer's clean image + variations/defects), scored by the hidden taste
   oracle, and ``num_pairs`` same-prompt pairs with noisy Bradley-Terry labels; held-out pairs
   the same way from the test-split prompts;
2. training: a small open_clip ``CLIP`` (:class:`opd_bench.rewards.pref.TinyPrefModel`) with the
   Bradley-Terry loss BCE(s_a - s_b, label), s = logit_scale.exp() * cos(text, image), plus a
   CLIP contrastive loss (weight ``clip_loss_weight``) between each prompt of a batch and its
   renderer image (the "captioned" image, as CLIP pre-training precedes PickScore's
   fine-tuning); AdamW, warm-up + cosine learning rate, random horizontal flips (the taste is
   mirror-symmetric). A batch = all images and pairs of ``batch_prompts`` prompts, so every
   image is encoded once per epoch;
3. metrics on the held-out pairs: accuracy against the noisy labels and against the noiseless
   oracle order, Spearman correlation of model score vs oracle on the held-out images.

Weights and ``config.json`` (architecture, vocabulary, training settings, metrics) go to
``out_dir``; the shipped model lives in ``opd_bench/suites/tiny/weights/pref/``.

    opd-bench pretrain pref --out DIR [--seed 0] [--num-pairs 20000] [--epochs 3]
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from opd_bench.world.pref_data import PairData, make_pair_data


def _to_tensor(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def score_images(model, images_u8: np.ndarray, prompts: Sequence[str], batch_size: int = 256
                 ) -> np.ndarray:
    """Model scores of uint8 images [N, H, W, 3] with one prompt each."""
    model.eval()
    out = []
    for i in range(0, len(images_u8), batch_size):
        x = _to_tensor(images_u8[i : i + batch_size])
        out.append(model.score(x, list(prompts[i : i + batch_size])).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def evaluate(model, data: PairData, batch_size: int = 256) -> dict:
    """Pairwise accuracies and correlations of ``model`` on ``data``."""
    prompts = [data.records[p]["prompt"] for p in data.prompt_index]
    s = score_images(model, data.images, prompts, batch_size)
    a, b = data.pairs[:, 0], data.pairs[:, 1]
    ds, dt = s[a] - s[b], data.taste[a] - data.taste[b]
    pred = ds > 0
    strict = np.abs(dt) > 1e-6
    clear = np.abs(dt) > 0.1
    labels = data.labels > 0.5
    bt = float(F.binary_cross_entropy_with_logits(
        torch.from_numpy(ds).float(), torch.from_numpy(data.labels).float()).item())
    per_prompt = []
    for p in np.unique(data.prompt_index):
        m = data.prompt_index == p
        r = _spearman(s[m], data.taste[m])
        if not math.isnan(r):
            per_prompt.append(r)
    # agreement of the noisy labels with the oracle (the ceiling for the noisy-label accuracy)
    return {
        "pairs": int(len(a)),
        "images": int(len(s)),
        "acc_vs_labels": float((pred == labels).mean()),
        "acc_vs_oracle": float((pred[strict] == (dt[strict] > 0)).mean()),
        "acc_vs_oracle_clear": float((pred[clear] == (dt[clear] > 0)).mean()) if clear.any() else float("nan"),
        "clear_pairs": int(clear.sum()),
        "labels_vs_oracle": float((labels[strict] == (dt[strict] > 0)).mean()),
        "bt_loss": bt,
        "spearman_images": _spearman(s, data.taste),
        "spearman_within_prompt": float(np.mean(per_prompt)) if per_prompt else float("nan"),
        "score_mean": float(s.mean()),
        "score_std": float(s.std()),
    }


def _batches(data: PairData, batch_prompts: int, rng: np.random.Generator):
    """(image indices, pair rows) of groups of ``batch_prompts`` prompts, shuffled."""
    prompts_with_pairs = np.unique(data.prompt_index[data.pairs[:, 0]])
    order = rng.permutation(prompts_with_pairs)
    pair_prompt = data.prompt_index[data.pairs[:, 0]]
    by_prompt: dict[int, list[int]] = {}
    for row, p in enumerate(pair_prompt.tolist()):
        by_prompt.setdefault(p, []).append(row)
    for i in range(0, len(order), batch_prompts):
        group = order[i : i + batch_prompts]
        rows = np.concatenate([np.asarray(by_prompt[int(p)]) for p in group])
        imgs = np.unique(data.pairs[rows].ravel())
        yield group, imgs, rows


def train_model(model, data: PairData, epochs: int = 2, batch_prompts: int = 8,
                lr: float = 2e-3, weight_decay: float = 0.05, clip_loss_weight: float = 0.1,
                warmup_frac: float = 0.05, seed: int = 0, progress: bool = True) -> list[float]:
    """Bradley-Terry (+ contrastive) training on ``data``; returns the mean loss per epoch."""
    rng = np.random.default_rng([int(seed), 13])
    gen = torch.Generator().manual_seed(int(seed))
    n_batches = math.ceil(len(np.unique(data.prompt_index[data.pairs[:, 0]])) / batch_prompts)
    total = max(1, epochs * n_batches)
    warm = max(1, int(warmup_frac * total))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "logit_scale" in name or "embedding" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, k / total))))
    # the renderer image of each prompt (image 0 of the prompt; flagged in info)
    clean_of: dict[int, int] = {}
    for j, p in enumerate(data.prompt_index.tolist()):
        if data.info and data.info[j].get("renderer"):
            clean_of.setdefault(p, j)
    labels_all = torch.from_numpy(data.labels).float()
    losses = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="pref train", unit="batch")
    for epoch in range(epochs):
        model.train()
        ep_loss, ep_n = 0.0, 0
        for group, imgs, rows in _batches(data, batch_prompts, rng):
            clean = [clean_of[int(p)] for p in group if int(p) in clean_of]
            all_imgs = np.unique(np.concatenate([imgs, np.asarray(clean, dtype=np.int64)]))
            pos = {int(j): k for k, j in enumerate(all_imgs)}
            x = _to_tensor(data.images[all_imgs])
            flip = torch.rand(len(x), generator=gen) < 0.5
            x[flip] = x[flip].flip(-1)
            texts = [data.records[int(p)]["prompt"] for p in group]
            tpos = {int(p): k for k, p in enumerate(group)}
            ie = model.encode_images(x)
            te = model.encode_texts(texts)
            img_text = torch.tensor([tpos[int(data.prompt_index[j])] for j in all_imgs])
            s = model.score_embeddings(ie, te[img_text])
            pa = torch.tensor([pos[int(j)] for j in data.pairs[rows, 0]])
            pb = torch.tensor([pos[int(j)] for j in data.pairs[rows, 1]])
            loss = F.binary_cross_entropy_with_logits(s[pa] - s[pb], labels_all[rows])
            if clip_loss_weight > 0 and len(clean) > 1:
                ci = torch.tensor([pos[j] for j in clean])
                ct = torch.tensor([tpos[int(data.prompt_index[j])] for j in clean])
                logits = model.scale() * ie[ci] @ te.t()  # [n_clean, n_text]
                target = ct
                lc = 0.5 * (F.cross_entropy(logits, target)
                            + F.cross_entropy(logits.t()[ct], torch.arange(len(ci))))
                loss = loss + clip_loss_weight * lc
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.clip.logit_scale.clamp_(0, math.log(100))
            ep_loss += float(loss.detach()) * len(rows)
            ep_n += len(rows)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.3f}")
        losses.append(ep_loss / max(ep_n, 1))
    if bar is not None:
        bar.close()
    model.eval()
    return losses


def pretrain_pref(out_dir: str | Path | None, seed: int = 0, num_pairs: int = 20000,
                  images_per_prompt: int = 5, num_test_pairs: int = 2000,
                  test_images_per_prompt: int = 6, epochs: int = 3, batch_prompts: int = 8,
                  lr: float = 2e-3, weight_decay: float = 0.05, clip_loss_weight: float = 0.1,
                  temperature: float = 0.05, flip: float = 0.03,
                  num_train_prompts: int | None = None, num_test_prompts: int | None = None,
                  threads: int | None = None, vision_cfg: dict | None = None,
                  progress: bool = True) -> dict:
    """Make pair data, train the tiny preference model, evaluate it, save it to ``out_dir``
    (``None``: do not save). Returns a dict of metrics (also stored in ``config.json``)."""
    from opd_bench.rewards.pref import TinyPrefModel, default_config
    from opd_bench.world import prompts as P

    if threads:
        torch.set_num_threads(int(threads))
    t_start = time.perf_counter()
    train_recs = P.read_jsonl(P.DEFAULT_DIR / "pref_train.jsonl")
    test_recs = P.read_jsonl(P.DEFAULT_DIR / "pref_test.jsonl")
    if num_train_prompts is not None:
        train_recs = train_recs[: int(num_train_prompts)]
    if num_test_prompts is not None:
        test_recs = test_recs[: int(num_test_prompts)]
    train = make_pair_data(train_recs, num_pairs, images_per_prompt, seed, temperature, flip,
                           progress=progress)
    test = make_pair_data(test_recs, num_test_pairs, test_images_per_prompt, seed + 1000,
                          temperature, flip, progress=progress)
    t_data = time.perf_counter() - t_start

    torch.manual_seed(int(seed))
    config = default_config()
    if vision_cfg:
        config["vision_cfg"] = {**config["vision_cfg"], **vision_cfg}
    model = TinyPrefModel(config)
    # before/after Bradley-Terry loss on (up to) 2000 training pairs
    sub = train.subset_pairs(2000)
    before = evaluate(model, sub)
    t0 = time.perf_counter()
    losses = train_model(model, train, epochs, batch_prompts, lr, weight_decay, clip_loss_weight,
                         seed=seed, progress=progress)
    t_train = time.perf_counter() - t0
    after = evaluate(model, sub)
    held = evaluate(model, test)
    metrics = {
        "seed": int(seed), "num_pairs": int(len(train.pairs)),
        "train_images": int(len(train.images)), "train_prompts": len(train_recs),
        "test_pairs": int(len(test.pairs)), "test_images": int(len(test.images)),
        "test_prompts": len(test_recs), "epochs": int(epochs), "batch_prompts": int(batch_prompts),
        "lr": lr, "weight_decay": weight_decay, "clip_loss_weight": clip_loss_weight,
        "label_temperature": temperature, "label_flip": flip,
        "parameters": int(model.num_parameters()),
        "epoch_losses": [round(x, 5) for x in losses],
        "train_bt_loss_before": before["bt_loss"], "train_bt_loss_after": after["bt_loss"],
        "train_acc_vs_labels": after["acc_vs_labels"],
        "heldout": held,
        "train_taste_mean": float(train.taste.mean()),
        "renderer_taste_mean": float(train.taste[[i for i, d in enumerate(train.info) if d.get("renderer")]].mean()),
        "data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    if out_dir is not None:
        model.save(out_dir, extra=metrics)
    return metrics
