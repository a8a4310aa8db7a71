"""Write the key references docs/reference/{param,machine}.md from the schemas (run by `make docs`)."""

from __future__ import annotations

import sys
from pathlib import Path

from spingen.schema import machine_arginfo, param_arginfo

DOCS = Path(__file__).resolve().parent.parent / "docs" / "reference"
TITLES = {"param": "param.json", "machine": "machine.json"}


def reference(which: str) -> str:
    """The markdown reference of one file, exactly as `spingen doc WHICH` prints it."""
    arginfo = param_arginfo() if which == "param" else machine_arginfo()
    return (f"# {TITLES[which]} key reference\n\nGenerated from spingen's schema by `make docs` "
            f"(same text as `spingen doc {which}`); do not edit by hand.\n\n"
            + arginfo.gen_doc(make_anchor=False) + "\n")


def main() -> int:
    DOCS.mkdir(parents=True, exist_ok=True)
    for which in TITLES:
        (DOCS / f"{which}.md").write_text(reference(which))
        print(f"wrote {DOCS / f'{which}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
