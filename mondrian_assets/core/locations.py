"""Where the app's data lives and where we write ours, resolved from explicit values or environment variables.

MONDRIAN_APP_DIR is the app's root (mondrian.db, source/, uploads/, analysis_md/); MONDRIAN_DB,
MONDRIAN_SOURCE_DIR and MONDRIAN_ANALYSIS_DIR override single locations; MONDRIAN_HOME holds everything we
write. Paths read from the app's DB are confined to the app's roots.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEMO_APP_DIRNAME = "demo_app"
STATE_DB_NAME = "mondrian_assets.db"


class PathRejected(ValueError):
    """A path from the app's DB that points outside the configured roots."""


@dataclass(frozen=True)
class Locations:
    app_dir: Path
    db_path: Path
    source_dir: Path
    analysis_dir: Path
    home: Path

    @classmethod
    def resolve(
        cls,
        *,
        app_dir: str | None = None,
        db_path: str | None = None,
        source_dir: str | None = None,
        analysis_dir: str | None = None,
        home: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Locations:
        env = os.environ if environ is None else environ
        home_path = Path(home or env.get("MONDRIAN_HOME") or Path.cwd()).expanduser().resolve()
        app = Path(app_dir or env.get("MONDRIAN_APP_DIR") or home_path / DEMO_APP_DIRNAME).expanduser().resolve()

        def pick(explicit: str | None, var: str, default: Path) -> Path:
            return Path(explicit or env.get(var) or default).expanduser().resolve()

        return cls(
            app_dir=app,
            db_path=pick(db_path, "MONDRIAN_DB", app / "mondrian.db"),
            source_dir=pick(source_dir, "MONDRIAN_SOURCE_DIR", app / "source"),
            analysis_dir=pick(analysis_dir, "MONDRIAN_ANALYSIS_DIR", app / "analysis_md"),
            home=home_path,
        )

    # --- what we write ---
    @property
    def training_data(self) -> Path:
        return self.home / "training_data"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def evaluation(self) -> Path:
        return self.home / "evaluation"

    @property
    def state_db(self) -> Path:
        return self.home / STATE_DB_NAME

    @property
    def manifest_path(self) -> Path:
        return self.training_data / "training_data_manifest.json"

    # --- what we read ---
    def image_path(self, filename: str) -> Path:
        """The app's `filename` column: `uploads/<uuid>_<name>` (or any relative path with a folder) is
        relative to the app root, a bare name lives in source/."""
        return _confined(self.image_lookups(filename)[0], (self.app_dir, self.source_dir), filename)

    def image_lookups(self, filename: str) -> tuple[Path, ...]:
        """The unresolved path `image_path` resolves (one: an image name has one place)."""
        raw = Path(filename.strip())
        if raw.is_absolute():
            return (raw,)
        return (self.source_dir / raw,) if len(raw.parts) == 1 else (self.app_dir / raw,)

    def analysis_file(self, reference: str) -> Path:
        """A stored analysis path: relative ones resolve against the app root, then analysis_md/."""
        lookups = self.analysis_lookups(reference)
        candidate = next((path for path in lookups[:-1] if path.exists()), lookups[-1])
        return _confined(candidate, (self.app_dir, self.analysis_dir), reference)

    def analysis_lookups(self, reference: str) -> tuple[Path, ...]:
        """The unresolved paths `analysis_file` tries, in order: the first that exists wins, else the last."""
        raw = Path(reference.strip())
        if raw.is_absolute():
            return (raw,)
        return (self.app_dir / raw,) if len(raw.parts) > 1 else (self.app_dir / raw, self.analysis_dir / raw)


def _confined(candidate: Path, roots: tuple[Path, ...], original: str) -> Path:
    resolved = candidate.resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise PathRejected(f"{original!r} resolves outside the app's folders ({resolved})")
    return resolved
