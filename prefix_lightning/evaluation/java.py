"""The official Java scorers, as bundled with `pycocoevalcap`: Stanford PTBTokenizer (CoreNLP 3.4.1) and METEOR 1.5.

Everything that needs Java goes through here, so that a missing or failing Java surfaces as one exception type,
`JavaUnavailable`, which the suites turn into a skipped metric and one warning instead of a crashed run.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import pycocoevalcap.meteor.meteor as coco_meteor
import pycocoevalcap.tokenizer.ptbtokenizer as coco_tokenizer

PTB_JAR = Path(coco_tokenizer.__file__).parent / coco_tokenizer.STANFORD_CORENLP_3_4_1_JAR
METEOR_JAR = Path(coco_meteor.__file__).parent / coco_meteor.METEOR_JAR
TIMEOUT_S = 600


class JavaUnavailable(RuntimeError):
    """Java is missing, or a Java scorer failed; the message says which and why."""


class MetricSkippedWarning(UserWarning):
    """A metric was left out of the scores (for example METEOR without Java)."""


def warn_skipped(metrics: list[str], reason: JavaUnavailable) -> None:
    """The one warning a suite gives when it leaves metrics out."""
    warnings.warn(f"{', '.join(metrics)} not computed: {reason}", MetricSkippedWarning, stacklevel=2)


def java_executable() -> str:
    """Path of `java` on PATH, or JavaUnavailable with the fix."""
    java = shutil.which("java")
    if java is None:
        raise JavaUnavailable(
            "no `java` on PATH; install a Java runtime (e.g. Debian's default-jre-headless) to get the official scores"
        )
    return java


def ptb_tokenize(texts: list[str]) -> list[str]:
    """The COCO caption evaluation's tokenization: PTBTokenizer `-preserveLines -lowerCase`, punctuation dropped.

    Same command and punctuation list as pycocoevalcap's `PTBTokenizer`, whose wrapper is not used because it
    writes its temporary file into the installed package. One call per list, as COCO tokenizes references and
    outputs separately (the lexer may look across line ends). Its quirks stay: "-lrb-" survives lowercasing.
    """
    java = java_executable()
    with tempfile.TemporaryDirectory(prefix="ptb-") as folder:
        path = Path(folder) / "sentences.txt"
        # One line per text: any line break inside a text (\n, \r, U+2028, ...) would shift every later line.
        path.write_text("\n".join(" ".join(text.splitlines()) for text in texts), encoding="utf-8")
        command = [java, "-cp", str(PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
        try:
            result = subprocess.run([*command, str(path)], capture_output=True, timeout=TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise JavaUnavailable(f"Stanford PTBTokenizer could not run: {err}") from err
    lines = result.stdout.decode("utf-8").split("\n")
    if result.returncode != 0 or len(lines) < len(texts) or any(lines[len(texts) :]):
        detail = result.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        raise JavaUnavailable(f"Stanford PTBTokenizer failed: {detail[0]}")
    punctuation = set(coco_tokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punctuation) for line in lines[: len(texts)]]


def meteor(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus METEOR 1.5 (`-l en -norm`, English defaults) from the statistics of all segments, on a 0-1 scale.

    Speaks the same stdio protocol to the same bundled jar as pycocoevalcap's `Meteor` wrapper, which e2e-metrics
    uses: one SCORE line per segment (METEOR picks the best reference), then one EVAL line over all the statistics,
    answered with each segment's score and last the corpus score. The wrapper itself is not used because it keeps
    a lock held after a failure, so that its destructor then blocks the interpreter forever.
    """
    java = java_executable()
    command = [java, "-jar", "-Xmx2G", str(METEOR_JAR), "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryFile() as errors:
        try:
            with subprocess.Popen(
                command, cwd=METEOR_JAR.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors
            ) as process:
                try:
                    stats = []
                    for hypothesis, refs in zip(hypotheses, references, strict=True):
                        hypothesis = hypothesis.replace("|||", "").replace("  ", " ")  # as the wrapper cleans it
                        stats.append(_ask(process, " ||| ".join(["SCORE", *refs, hypothesis]), answers=1)[0])
                    return float(_ask(process, " ||| ".join(["EVAL", *stats]), answers=len(stats) + 1)[-1])
                finally:
                    process.kill()
        except (OSError, ValueError) as err:  # no process, a closed pipe, or an answer that is not a number
            errors.seek(0)
            detail = errors.read().decode("utf-8", "replace").strip().splitlines()[-1:] or [repr(err)]
            raise JavaUnavailable(f"METEOR 1.5 (java -jar meteor-1.5.jar) failed: {detail[0]}") from err


def _ask(process: subprocess.Popen, line: str, answers: int) -> list[str]:
    """Send one line to METEOR and read its answer lines; ValueError if it stopped answering."""
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write((" ".join(line.replace("\r", "\n").split("\n")) + "\n").encode("utf-8"))  # Java's line ends
    process.stdin.flush()
    lines = [process.stdout.readline().decode("utf-8").strip() for _ in range(answers)]
    if not all(lines):
        raise ValueError("METEOR stopped answering")
    return lines
