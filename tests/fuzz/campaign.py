"""A fuzzing campaign: numbered cases, each a mutant of one seed run through ``info``,
``extract`` and ``analyze``; a report of what happened, and every failure saved to reproduce.

Case ``n`` of campaign seed ``s`` is the same bytes and the same command lines on any machine
and in any order: its random numbers come from ``Random(f"{s}:{n}")``, and its seed is
``seeds[n % len(seeds)]`` (so every format gets its share).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.fuzz.mutate import Mutant, mutate
from tests.fuzz.runner import Limits, Outcome, Task, command_line, remove, run_tasks
from tests.fuzz.seeds import Seed, all_seeds

COMMANDS = ("info", "extract", "analyze")
FORMAT_NAMES = ("xc-core", "elf", "kdump", "qemu-stream", "libvirt-save", "lime", "raw")


@dataclass
class Case:
    number: int
    seed: Seed
    mutant: Mutant
    tasks: list[Task]


@dataclass
class Report:
    cases: int = 0
    commands: int = 0
    seconds: float = 0.0
    by_format: Counter[str] = field(default_factory=Counter)
    by_seed: Counter[str] = field(default_factory=Counter)
    #: command -> outcome label ("exit 4", "SIGXCPU") -> count
    outcomes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    failures: list[Outcome] = field(default_factory=list)
    #: failure signature -> the saved reproducer directories
    signatures: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    cpu_seconds: float = 0.0
    slowest: tuple[float, str] = (0.0, "")

    def lines(self) -> list[str]:
        out = [f"{self.cases} cases, {self.commands} commands in {self.seconds:.0f} s"]
        out.append("cases per format: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_format.items())))
        out.append("cases per seed:   " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_seed.items())))
        for command in COMMANDS:
            if command in self.outcomes:
                counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.outcomes[command].items()))
                out.append(f"{command:<8} {counts}")
        out.append(f"CPU time of the commands {self.cpu_seconds:.0f} s; slowest {self.slowest[0]:.2f} s CPU")
        out.append(f"{len(self.failures)} failing commands, {len(self.signatures)} distinct failures")
        for sig, dirs in sorted(self.signatures.items()):
            out.append(f"  [{len(dirs)}x] {sig}  e.g. {dirs[0]}")
        return out


def case_random(campaign_seed: int, number: int) -> random.Random:
    return random.Random(f"dengine-fuzz:{campaign_seed}:{number}")


def select_seeds(formats: set[str] | None) -> tuple[Seed, ...]:
    seeds = all_seeds()
    if formats:
        seeds = tuple(s for s in seeds if s.format in formats or s.name in formats)
    if not seeds:
        raise SystemExit(f"no seed of {sorted(formats or ())}")
    return seeds


def make_case(
    number: int, campaign_seed: int, seeds: tuple[Seed, ...], work: Path, *, one_command: bool = False
) -> Case:
    """The mutant and the three command lines of one case, under ``work/case-N`` (with
    ``one_command``, only one of them, in turn by case number: the CI slice)."""
    r = case_random(campaign_seed, number)
    seed = seeds[number % len(seeds)]
    mutant = mutate(seed, r)
    name = f"case-{number}{seed.suffix}"
    root = work / f"case-{number}"
    tasks = []
    for command in COMMANDS:
        if one_command and command != COMMANDS[number % len(COMMANDS)]:
            continue
        t = root / command
        inp = t / "input"
        inp.mkdir(parents=True, exist_ok=True)
        (inp / name).write_bytes(mutant.data)
        path = str(inp / name)
        inputs = [name]
        tmp = ["--tmp-dir", str(t / "tmp")]
        if command == "info":
            argv = ["-q", "info", path, *tmp]
            as_json = r.random() < 0.5
            if as_json:
                argv.append("--json")
            if r.random() < 0.1:
                argv += ["--format", r.choice(FORMAT_NAMES)]
            tasks.append(Task(number, command, argv, t, inputs, json_stdout=as_json))
        elif command == "extract":
            argv = ["-q", "extract", path, "-o", str(t / "out" / "flat.raw"), *tmp]
            tasks.append(Task(number, command, argv, t, inputs, output="flat.raw"))
        else:
            argv = ["-q", "analyze", path]
            if r.random() < 0.2 and not seed.wrap:
                # A second, pristine dump: cross-VM sharing against the mutant.
                other = f"seed{seed.suffix}"
                (inp / other).write_bytes(seed.data)
                argv.append(str(inp / other))
                inputs.append(other)
            argv += ["--index-dir", str(t / "index"), *tmp]
            argv += ["--memory-limit", r.choice(("64M", "64M", "1M"))]
            if r.random() < 0.85:
                argv += ["-j", "1"]  # else every CPU: the threaded and forked paths
            fmt = r.choice(("table", "json", "csv"))
            argv += ["--format", fmt]
            if r.random() < 0.4:
                argv.append("--sharing-only")
            tasks.append(Task(number, command, argv, t, inputs, json_stdout=fmt == "json"))
    return Case(number, seed, mutant, tasks)


def signature(outcome: Outcome, seed: Seed) -> str:
    """What makes two failures the same bug: the command, the seed's format, the first problem,
    and the last stderr line with numbers and paths blurred."""
    err = outcome.stderr.decode("utf-8", "replace").strip().splitlines()
    last = err[-1] if err else ""
    last = re.sub(r"/\S+", "PATH", last)
    last = re.sub(r"0x[0-9a-f]+|\d+", "N", last)
    return f"{outcome.task.command} {seed.format}: {outcome.problems[0]}: {last[:160]}"


def save_failure(outcome: Outcome, case: Case, campaign_seed: int, results: Path) -> Path:
    """The reproducer: the input files as the command saw them, the command line, what it
    printed, and how the input was made."""
    t = outcome.task
    dest = results / f"case-{case.number}-{t.command}"
    remove(dest)
    dest.mkdir(parents=True)
    shutil.copytree(t.dir("input"), dest / "input")
    argv = [a.replace(str(t.root), "..") for a in t.argv]
    script = (
        "#!/bin/sh\n# Reproduces a dengine fuzz failure: run from anywhere.\n"
        'cd "$(dirname "$0")/input" && mkdir -p ../out ../tmp ../index && exec '
        + command_line(Task(t.case, t.command, argv, t.root, t.inputs)).replace(
            "dengine -q", "dengine --debug"
        )
        + "\n"
    )
    (dest / "command.sh").write_text(script)
    (dest / "command.sh").chmod(0o755)
    (dest / "stdout.txt").write_bytes(outcome.stdout[:65536])
    (dest / "stderr.txt").write_bytes(outcome.stderr[:65536])
    about = {
        "campaign_seed": campaign_seed,
        "case": case.number,
        "seed": case.seed.name,
        "format": case.seed.format,
        "mutations": case.mutant.steps,
        "command": t.command,
        "outcome": outcome.label,
        "problems": outcome.problems,
        "seconds": round(outcome.seconds, 3),
        "cpu_seconds": round(outcome.cpu, 3),
        "replay": f".venv/bin/python -m tests.fuzz --seed {campaign_seed} --case {case.number}",
    }
    (dest / "about.json").write_text(json.dumps(about, indent=2) + "\n")
    return dest


def run_campaign(
    numbers: range | list[int],
    campaign_seed: int,
    jobs: int,
    work: Path,
    results: Path | None,
    *,
    formats: set[str] | None = None,
    limits: Limits | None = None,
    one_command: bool = False,
    on_outcome: Callable[[Outcome, Report], None] | None = None,
) -> Report:
    """Run the cases ``numbers``; failures are saved under ``results`` (when given)."""
    seeds = select_seeds(formats)
    limits = limits or Limits()
    report = Report()
    cases: dict[int, Case] = {}
    left: Counter[int] = Counter()
    started = time.monotonic()

    def tasks() -> Iterator[Task]:
        for n in numbers:
            case = make_case(n, campaign_seed, seeds, work, one_command=one_command)
            cases[n] = case
            left[n] = len(case.tasks)
            report.cases += 1
            report.by_format[case.seed.format] += 1
            report.by_seed[case.seed.name] += 1
            yield from case.tasks

    for outcome in run_tasks(tasks(), jobs, limits):
        case = cases[outcome.task.case]
        report.commands += 1
        report.cpu_seconds += outcome.cpu
        if outcome.cpu > report.slowest[0]:
            report.slowest = (outcome.cpu, f"case {case.number} {outcome.task.command}")
        report.outcomes[outcome.task.command][outcome.label] += 1
        if not outcome.ok:
            report.failures.append(outcome)
            where = "(not saved)"
            if results is not None:
                where = str(save_failure(outcome, case, campaign_seed, results))
            report.signatures[signature(outcome, case.seed)].append(where)
        if on_outcome is not None:
            on_outcome(outcome, report)
        left[case.number] -= 1
        if left[case.number] == 0:
            remove(work / f"case-{case.number}")
            del cases[case.number]
    report.seconds = time.monotonic() - started
    return report
