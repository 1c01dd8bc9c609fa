"""The four scripts import nothing from each other: a utility they share (device choice, file writing,
errors, the command-line parser, data loaders, k-NN / probe / effective rank, distributed helpers) is
a deliberate copy in each, so that any one file can be copied alone. This file finds every such copy
by itself, with `ast`: every top-level def, class and UPPERCASE constant defined in more than one
script, and asserts that its source text (decorators included: @torch.no_grad() is behaviour) is
character-identical in every script that defines it, mae_decay.py's being the reference. A name
that does a script's own job under a common name (its model, its knobs, its training loop) is
listed in OWN_JOB with the reason; nothing else may differ. Reads the files only: fast, no torch."""
import ast
import difflib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("mae_decay.py", "diffusion_decay.py", "linear_theory.py", "probe.py")  # the first that defines a name is its reference


def definitions(script):
    """{name: [source text of each top-level definition of it]}: defs and classes from their first
    decorator to their last line, UPPERCASE constants (NAME = ... or NAME: type = ...) whole."""
    with open(os.path.join(ROOT, script)) as f:
        source = f.read()
    lines = source.splitlines()
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper()]
        else:
            continue
        start = min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])
        for name in names:
            found.setdefault(name, []).append("\n".join(lines[start - 1:node.end_lineno]))
    return found


DEFINITIONS = {script: definitions(script) for script in SCRIPTS}
SHARED = sorted(name for name in set().union(*DEFINITIONS.values())
                if sum(name in found for found in DEFINITIONS.values()) > 1)

## The allow-list: names that several scripts define, each for ITS OWN job, so their text differs by
## design. Decided by reading every definition; everything not listed here must be a verbatim copy.
OWN_JOB = {
    # the knobs and their checks: every script has its own flags, defaults, presets and rules
    "Config": "each script's own knobs and defaults",
    "PRESETS": "mae_decay.py's ViT presets vs diffusion_decay.py's DiT presets",
    "CHOICES": "each script's own flags with a fixed set of values (decoder, feature vs sampler, time_dist)",
    "parse_config": "builds each script's own command line (presets, positional features files, a command)",
    "check_config": "validates each script's own knobs",
    "main": "each script's own run: train a sweep, evaluate inputs, or run one of four commands",
    # the model and its training: an MAE vs a flow-matching DiT
    "build_model": "builds the script's own model (MAE ViT vs DiT with long skips, class embedding)",
    "init_weights": "the initialisation of the script's own model (MAE tokens and zeroed branches vs adaLN-Zero)",
    "train_run": "the script's own training loop (MAE loss vs flow loss, EMA, sampling)",
    # each script's --study: the same idea (arms x seeds, one table), but MAE arms and worker processes
    # vs DiT arms in one process, and each reports its own metrics (k-NN per block vs FD)
    "study_arms": "the script's own arms (vanilla / skip decoder alpha_min vs plain / skips / decay)",
    "study_benchmark": "times the script's own arms (MAE workers at once vs DiT steps in one process)",
    "study_metrics": "the script's own columns (probes per block vs FD with its floor)",
    "study_report": "the script's own table and verdict layout for its metrics",
    "TRAJECTORY_KEYS": "the knobs that change each script's training trajectory (resume refuses if they differ)",
    "save_checkpoint": "the script's own state (diffusion_decay.py also saves the EMA model and the skips setting)",
    "load_checkpoint": "restores the script's own state (diffusion_decay.py also the EMA model and the skips setting)",
    "read_checkpoint": "reads and checks the script's own checkpoint (diffusion_decay.py: also the skips setting, and "
                       "the compile mode of older checkpoints)",
    "start_or_resume": "a fresh run's state or the script's own checkpoint loaded (diffusion_decay.py: also the EMA model)",
    "OUT_DIR_KEYS": "the settings an out-dir's config.json must agree on: each script's own trajectory and arms",
    "SCRIPT": "the script's own file name, written into what it writes to say whose files they are",
    "run_experiment": "each script's own experiment: its arms, seeds, checks and report",
    "run_benchmark": "times the script's own training step",
    # evaluation and report of the script's own model
    "extract_features": "features of the script's own model (MAE encoder block vs the DiT's encoder half at noise t)",
    "describe_feature": "describes the script's own feature (block and pooling vs noise level)",
    "finish_run": "the script's own final evaluation (diffusion_decay.py adds the Frechet distance and samples)",
    "results_table": "the script's own table of results",
    "save_plots": "the script's own figures",
}
## A name that is a copy in some scripts but does its own job in one: (name, script) -> why.
OWN_JOB_IN = {
    ("describe_probe", "probe.py"): "names probe.py's configurable probe (--probe-batch-size, --probe-epochs 0 = none); "
                                    "the training scripts' probe has a fixed batch of 1024",
}
## Changed here first, to be copied into the other scripts by the lead: expected to differ until then.
PENDING = {}  # name -> why its copies may differ for now (empty: every copy is verbatim)


def reference_of(name):
    return next(script for script in SCRIPTS if name in DEFINITIONS[script] and (name, script) not in OWN_JOB_IN)


COPIES = [(name, script) for name in SHARED if name not in OWN_JOB for script in SCRIPTS
          if name in DEFINITIONS[script] and (name, script) not in OWN_JOB_IN and script != reference_of(name)]


@pytest.mark.parametrize("name,script", [
    pytest.param(name, script, marks=[pytest.mark.xfail(strict=False, reason=PENDING[name])] if name in PENDING else [])
    for name, script in COPIES], ids=[f"{name}-{script}" for name, script in COPIES])
def test_shared_name_is_a_verbatim_copy(name, script):
    reference = reference_of(name)
    ours, theirs = DEFINITIONS[script][name], DEFINITIONS[reference][name]
    assert len(ours) == len(theirs) == 1, f"{name} is defined more than once at top level"
    diff = "\n".join(difflib.unified_diff(theirs[0].splitlines(), ours[0].splitlines(), reference, script, lineterm=""))
    if ours != theirs:
        pytest.fail(f"{script}'s {name} differs from {reference}'s:\n{diff}", pytrace=False)


def test_the_search_finds_the_known_copies():
    # a guard on the search itself: a broken parser would find nothing and pass every test above
    for name in ("pick_device", "UserError", "load_folder", "knn_predict", "CIFAR", "OneSentenceParser", "atomic_save"):
        assert name in SHARED and (name, "probe.py") in COPIES, name
    assert len(COPIES) > 80


def test_allow_lists_name_real_shared_definitions():
    # an entry whose name is gone (renamed, removed, or left in one script only) must leave the list
    stale = [name for name in list(OWN_JOB) + list(PENDING) + [name for name, _ in OWN_JOB_IN] if name not in SHARED]
    assert not stale, f"no longer defined in two scripts, remove from the allow-lists: {stale}"
    assert not set(OWN_JOB) & set(PENDING)


def test_no_script_defines_a_name_twice():
    # a second top-level definition silently replaces the first: the copy checked above would not be the one that runs
    twice = [(script, name) for script, found in DEFINITIONS.items() for name, texts in found.items() if len(texts) > 1]
    assert not twice, twice
