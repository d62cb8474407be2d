"""YAML for recipes: plain values only. ``yaml.safe_load`` already refuses Python object tags; this
loader also refuses aliases (``*name``: a 600-byte alias bomb expands to gigabytes) and duplicate
keys (the second silently won), and names each problem for what it is, not as a syntax error."""

from __future__ import annotations

from typing import Any

from quantcli.errors import InputError
from quantcli.limits import shown


def _where(mark: Any) -> str:
    return f" at line {mark.line + 1}" if mark is not None else ""


def load_strict(text: str, path: Any) -> Any:
    """Parse ``text`` (the recipe at ``path``) with aliases, duplicate keys and custom tags refused."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.events.AliasEvent):
                event = self.peek_event()
                raise InputError(
                    f"recipe {path} uses a YAML alias (*{shown(event.anchor)[1:-1]}){_where(event.start_mark)}; "
                    "recipes must spell every value out."
                )
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) or key is None:
                    if key in seen:
                        raise InputError(
                            f"recipe {path} sets {shown(key)} twice{_where(key_node.start_mark)}. Keep one."
                        )
                    seen.add(key)
            return super().construct_mapping(node, deep)

    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.constructor.ConstructorError as error:
        import re

        found = re.search(r"'tag:yaml\.org,2002:([^']*)'|'(![^']*)'", str(error.problem or ""))
        tag = ("!!" + found.group(1) if found.group(1) is not None else found.group(2)) if found else "a custom tag"
        raise InputError(
            f"recipe {path} uses the YAML tag {shown(tag)[1:-1]}{_where(error.problem_mark)}, which quantcli does not "
            "construct:"
            " recipes hold plain values only (numbers, strings, lists, mappings)."
        ) from None
    except yaml.YAMLError as error:
        raise InputError(
            f"recipe {path} is not valid YAML{_where(getattr(error, 'problem_mark', None))}. Fix the syntax and try "
            "again."
        ) from None
    except ValueError as error:  # e.g. an integer of more than 4,300 digits
        raise InputError(
            f"recipe {path} holds a value quantcli cannot read ({str(error).split(';')[0][:100]})."
        ) from None
    except RecursionError:
        raise InputError(f"recipe {path} nests too deeply. Recipes are flat mappings.") from None
