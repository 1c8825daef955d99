"""The commands of ``python -m jobs`` (and ``mmsynth``): one table that the command line, the
driver and the run report read, so none of them imports another to find a pipeline.

A *pipeline* is a recipe pipeline module run by ``jobs.core.driver`` (``RECIPE``, ``stages``,
``ingest``, ``export``); a *command* is a function ``main(argv) -> exit status``. Targets are
import paths, imported only when the command runs, so ``jobs.core`` never imports a pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One entry of ``python -m jobs``: ``name`` (the first argument), ``target`` (a pipeline
    module ``"jobs.antidote"`` or a function ``"module:function"``), a one-line ``purpose`` and a
    runnable ``example`` (on the bundled data where one exists)."""

    name: str
    target: str
    purpose: str
    example: str
    pipeline: bool = False

    @property
    def module(self) -> str:
        """The module that holds the command (the pipeline module, or the function's module)."""
        return self.target.partition(":")[0]


COMMANDS: tuple[Command, ...] = (
    Command("antidote", "jobs.antidote", "Antidote: caption pool -> images -> CPQ/TPQ/POPE/description "
            "queries (hallucination-mitigation VQA data)",
            "python -m jobs antidote --input data/captions/coco2017_mini.jsonl --output out/antidote --limit 8",
            pipeline=True),
    Command("antidote-pairs", "jobs.antidote_pairs", "Antidote preference pairs: the target VLM answers every "
            "query with and without its hint; DPO pairs by query type (ms-swift and TRL formats); --evaluate "
            "scores the answers", "python -m jobs antidote-pairs --input out/antidote --output out/antidote-pairs",
            pipeline=True),
    Command("antidote-dpo-train", "jobs.antidote_dpo:main", "DPO with a LoRA on Antidote pairs (TRL DPOTrainer "
            "on Ray Train, resumable checkpoints)", "python -m jobs antidote-dpo-train --data out/antidote-pairs "
            "--output out/antidote-dpo --max-steps 2"),
    Command("mmgen", "jobs.mmgen", "MM-GEN: targeted VQA data (LLaVA format) from a few reference samples "
            "and a pool of candidate images",
            "python -m jobs mmgen --input ../shared/data/vqa/scienceqa_test_subset.jsonl "
            "--candidates ../shared/data/captions/coco_mini_images --keywords map,diagram,photo "
            "--task-description 'Science questions' --total-gen 12 --output out/mmgen", pipeline=True),
    Command("mirror", "jobs.mirror", "MIRROR: counselling dialogues with identity-preserving client face "
            "images (dataset)",
            "python -m jobs mirror --input data/counseling/cactus_eval_intake.jsonl --faces data/faces "
            "--output out/mirror --limit 1", pipeline=True),
    Command("mirror-llava-data", "jobs.mirror_llava.data:main", "MIRROR-LLaVA training records (LLaVA-1.5 "
            "JSON) from a MIRROR run", "python -m jobs mirror-llava-data --input out/mirror --output "
            "out/llava-data --cot ec_planning"),
    Command("mirror-llava-train", "jobs.mirror_llava.train:main", "LoRA fine-tuning of the counselling VLM "
            "on Ray Train (resumable checkpoints)", "python -m jobs mirror-llava-train --data "
            "out/llava-data/train.json --output out/llava-ckpt --max-steps 4"),
    Command("mirror-llava-serve", "jobs.mirror_llava.serve:main", "the counselling services (describe, "
            "generate, verify, client, counselor) on Ray Serve", "python -m jobs mirror-llava-serve --port 8000"),
    Command("mirror-llava-infer", "jobs.mirror_llava.infer:main", "simulated counselling sessions with a "
            "fine-tuned counselor through those services", "python -m jobs mirror-llava-infer --input "
            "out/mirror/mirror_data.csv --model out/llava-ckpt --cot planning --output out/sessions --limit 1"),
    Command("submit", "jobs.core.cli:submit", "run any command above as a Ray job on a cluster "
            "(working_dir = this folder)", "python -m jobs submit antidote --input ... --output s3://bucket/out "
            "--address http://HEAD:8265"),
    Command("status", "jobs.core.cli:status", "print the per-stage funnel of a finished run",
            "python -m jobs status out/antidote"),
    Command("report", "jobs.core.report:main", "(re)write a run's report.html", "python -m jobs report out/antidote"),
    Command("export", "jobs.core.export:main", "a finished run's outputs as a Hugging Face dataset (Parquet "
            "shards, images embedded, dataset card); --push-to-hub REPO uploads it",
            "python -m jobs export out/antidote --format hf --to out/antidote-hf"),
)

BY_NAME: dict[str, Command] = {c.name: c for c in COMMANDS}
#: recipe pipelines: name -> module
PIPELINES: dict[str, str] = {c.name: c.target for c in COMMANDS if c.pipeline}


def command_for(manifest: dict) -> Command | None:
    """The command that wrote a run's ``manifest.json`` (its ``pipeline`` or ``command`` field)."""
    name = manifest.get("pipeline") or manifest.get("command") or ""
    return BY_NAME.get(name)
