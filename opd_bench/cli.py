"""The ``opd-bench`` command line. Heavy imports happen inside commands so ``--help`` is instant."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

# Errors that mean "bad input": shown as one line, no traceback.
_USER_ERRORS = ("ModelLoadError", "PromptFileError", "UnknownNameError", "FileExistsError", "FileNotFoundError")


def _friendly(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - re-raised unless it is a known user error
            if type(error).__name__ in _USER_ERRORS or isinstance(error, ValueError):
                raise click.ClickException(str(error).splitlines()[0]) from None
            raise

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="opd-bench")
def main() -> None:
    """Compare DiffusionOPD with multi-reward and cascade RL on text-to-image flow models."""


@main.command("list")
@click.argument("what", type=click.Choice(["rewards", "benchmarks"]))
def list_(what: str) -> None:
    """List the registered rewards or benchmarks."""
    if what == "rewards":
        from opd_bench.rewards import REGISTRY
    else:
        from opd_bench.benchmarks import REGISTRY
    for name in REGISTRY.names():
        click.echo(f"{name:28s} {REGISTRY.help(name)}")


@main.command("build-tiny")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed of the random initialisation.")
@click.option("--force", is_flag=True, help="Overwrite an existing folder.")
@_friendly
def build_tiny(out: Path, seed: int, force: bool) -> None:
    """Save a random-init miniature SD3 pipeline (a diffusers folder) to OUT."""
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; choose another folder or pass --force")
    from opd_bench.tiny import save_tiny

    save_tiny(out, seed=seed)
    click.echo(f"saved a random tiny SD3 pipeline to {out}")


@main.command()
@click.option("--model", required=True, help="Pipeline folder or hub id (SD3 family).")
@click.option("--prompt", "prompts", multiple=True, required=True, help="A prompt; repeat for several.")
@click.option("--images-per-prompt", default=2, show_default=True)
@click.option("--steps", default=10, show_default=True)
@click.option("--guidance", default=4.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--noise-level", default=0.0, show_default=True, help="0 = ODE (Euler); >0 = Flow-GRPO SDE.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG grid to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@_friendly
def sample(model, prompts, images_per_prompt, steps, guidance, noise_level, seed, device, out, force) -> None:
    """Sample images with the shared rollout and save them as one grid (rows = prompts)."""
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; choose another path or pass --force")
    from opd_bench.io import save_grid
    from opd_bench.policy import Policy
    from opd_bench.rollout import rollout

    policy = Policy.from_pretrained(model, device=device)
    trajectory = rollout(
        policy,
        list(prompts),
        images_per_prompt=images_per_prompt,
        num_steps=steps,
        noise_level=noise_level,
        guidance_scale=guidance,
        seed=seed,
        keep={"images"},
    )
    save_grid(trajectory.images, out, columns=images_per_prompt)
    click.echo(f"wrote {len(trajectory)} images to {out}")


if __name__ == "__main__":
    sys.exit(main())
