"""``--reference NAME`` of fit-bn and fit-centers: a reference layer's settings as defaults."""

from __future__ import annotations

from typing import Any, Optional

import click

from normstats.references import REFERENCES, help_text, with_reference

from .params import given, option


def reference_option(kind: str, what: str, note: str = "") -> Any:
    """The ``--reference`` option of a fit of `kind` statistics; `what` names the
    options it sets (explicit ones win), `note` follows the list."""
    return option("--reference", type=click.Choice(list(REFERENCES)), metavar="|".join(REFERENCES),
                  help=f"Set {what} as the reference layer's code had them (given options win): "
                       f"{help_text(kind)}.{' ' + note if note else ''}")


def referenced(ctx: click.Context, name: Optional[str], kind: str, **values: Any) -> tuple[dict, set]:
    """`values` (the options as parsed) with those reference `name` sets, unless typed
    on the command line; and the names it set, which a continued fit takes as given."""
    if name is None:
        return values, set()
    typed = {key for key in values if given(ctx, key)}
    chosen = with_reference(name, kind, values, typed)
    return chosen, {key for key in chosen if key not in typed and key in REFERENCES[name].options(kind)}
