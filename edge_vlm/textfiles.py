"""Reading the small text files users hand us (source descriptions, recipes, datasets' questions):
every way they can be unreadable becomes the caller's typed error naming the file, never a traceback."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


MAX_BYTES = 256 << 20  # a source description or a recipe is a few kB; easy-VQA's questions.json 3 MB


def read_structured(path: Path, error: type[Exception], parse: Callable[[str], object] = json.loads,
                    what: str = "JSON") -> object:
    """`parse(text of path)`; unreadable, not UTF-8, unparsable or absurdly nested -> `error` naming it."""
    path = Path(path)
    try:
        if not path.is_file():  # a folder, a FIFO (reading it would hang), a device
            raise error(f"{path} is not a regular file" if path.exists() else f"{path} does not exist")
        if path.stat().st_size > MAX_BYTES:
            raise error(f"{path} is {path.stat().st_size >> 20} MB: more than a {what} file edge-vlm reads "
                        f"({MAX_BYTES >> 20} MB at most)")
        return parse(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text (byte {e.start}): is it the right file?") from None
    except (ValueError, RecursionError) as e:  # a parse error, a 5000-digit number, nesting past the stack
        raise error(f"{path} is not valid {what}: {str(e)[:200]}") from None
