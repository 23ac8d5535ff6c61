"""The import directions the README's Layout section states, read from the source with ``ast``.

curation.common imports nothing else of the project; curation imports neither training nor
pipelines; training imports from curation only curation.common and curation's data formats (the
job entry training/train.py also runs the curation job, for the demo); no module imports another
module's private (``_name``) names.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("curation", "training", "pipelines")
# curation's data formats and data sources that training reads
TRAINING_MAY_IMPORT = ("curation.common", "curation.images", "curation.ingest", "curation.output",
                       "curation.demo_data")
# the training job entry curates the demo data before training on it (README, Layout)
JOB_ENTRY_EXCEPTIONS = {"training/train.py": ("curation.pipeline",)}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = REPO.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def project_imports(path: Path):
    """``(module, name or None, line)`` for every import of a project module in ``path``; ``from
    pkg import sub`` of a submodule counts as an import of ``pkg.sub``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if is_module(sub):
                    yield sub, None, node.lineno
                else:
                    yield node.module, alias.name, node.lineno


def files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))]


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_import_directions_of_the_readme_layout():
    wrong = []
    for path in files(*PACKAGES):
        rel = path.relative_to(REPO).as_posix()
        me = module_name(path)
        for module, _name, line in project_imports(path):
            where = f"{rel}:{line} imports {module}"
            if within(me, "curation.common") and not within(module, "curation.common"):
                wrong.append(f"{where}: curation.common imports nothing else of the project")
            elif within(me, "curation") and not within(module, "curation"):
                wrong.append(f"{where}: curation imports neither training nor pipelines")
            elif within(me, "training") and within(module, "pipelines"):
                wrong.append(f"{where}: training does not import the job entry points")
            elif within(me, "training") and within(module, "curation"):
                allowed = TRAINING_MAY_IMPORT + JOB_ENTRY_EXCEPTIONS.get(rel, ())
                if not any(within(module, a) for a in allowed):
                    wrong.append(f"{where}: training reads curation's formats only ({allowed})")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_modules_private_names():
    wrong = []
    for path in files(*PACKAGES, "tests", "benchmarks"):
        rel = path.relative_to(REPO).as_posix()
        me = module_name(path)
        for module, name, line in project_imports(path):
            if name and name.startswith("_") and module != me:
                wrong.append(f"{rel}:{line} imports {module}.{name}")
    assert not wrong, "\n".join(wrong)


def test_no_package_module_reaches_into_another_modules_private_names():
    """``module._name`` through an imported project module (tests may reset private caches)."""
    wrong = []
    for path in files(*PACKAGES, "benchmarks"):
        rel = path.relative_to(REPO).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bound = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in PACKAGES:
                        bound[alias.asname or alias.name.split(".")[0]] = alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    if node.module.split(".")[0] in PACKAGES and is_module(f"{node.module}.{alias.name}"):
                        bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                wrong.append(f"{rel}:{node.lineno} uses {bound[node.value.id]}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_the_checks_see_the_imports_they_judge():
    """The walker finds the known imports (a check that finds nothing proves nothing)."""
    found = {(m, n) for m, n, _ in project_imports(REPO / "training" / "concepts.py")}
    assert ("curation.common.nlp", "is_object") in found
    found = {(m, n) for m, n, _ in project_imports(REPO / "pipelines" / "label_concepts.py")}
    assert ("training.concepts", None) in found
