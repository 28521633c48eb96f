"""Reading the small text files users hand us (source descriptions, recipes, datasets' questions):
every way they can be unreadable becomes the caller's typed error naming the file, never a traceback."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def read_structured(path: Path, error: type[Exception], parse: Callable[[str], object] = json.loads,
                    what: str = "JSON") -> object:
    """`parse(text of path)`; unreadable, not UTF-8, unparsable or absurdly nested -> `error` naming it."""
    path = Path(path)
    try:
        return parse(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text (byte {e.start}): is it the right file?") from None
    except (ValueError, RecursionError) as e:  # a parse error, a 5000-digit number, nesting past the stack
        raise error(f"{path} is not valid {what}: {str(e)[:200]}") from None
