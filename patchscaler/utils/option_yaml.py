"""The YAML dialect of option files: what ``tools/*.py`` and BasicSR's own ``parse_options`` read them with.

PyYAML follows YAML 1.1, where a key given twice keeps the last value without a word (a second ``scale: 2``
gives ×2 output from a ×4 model) and ``4e-4`` without a dot is a *string* (a TypeError deep inside the optimizer,
mid-training). :class:`OptionLoader` (a SafeLoader; mappings as OrderedDict, as BasicSR's ``ordered_yaml``):

* refuses a key given twice in one mapping (:class:`ConfigError` naming the key and both lines);
* reads ``4e-4``, ``1e5``, ``-2E-3`` as floats (YAML 1.2's rule); ``!!float 4e-4`` still works.

``compat`` hands it to BasicSR (``basicsr.utils.options.ordered_yaml``), so training reads the file as the
checks did.
"""
import re
from collections import OrderedDict

import yaml

from .errors import ConfigError

FLOAT = re.compile(r'''^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$''', re.X)


class OptionLoader(yaml.SafeLoader):
    """See the module docstring."""


def _mapping(loader, node):
    seen = {}
    for key_node, _ in node.value:  # the mapping's own keys; keys merged in with << may be overridden
        if key_node.tag == 'tag:yaml.org,2002:merge':
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            again = key in seen
        except TypeError:
            raise ConfigError(f'{key_node.start_mark.name}: line {line}: a key must be a plain value, got '
                              f'{type(key).__name__}') from None
        if again:
            raise ConfigError(f"{key_node.start_mark.name}: the key '{key}' is given twice in one mapping (lines "
                              f"{seen[key]} and {line}); YAML would keep the last without a word")
        seen[key] = line
    loader.flatten_mapping(node)  # merged pairs first, the mapping's own after them: its own win
    return OrderedDict(loader.construct_pairs(node, deep=True))


OptionLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
OptionLoader.add_implicit_resolver('tag:yaml.org,2002:float', FLOAT, list('-+0123456789.'))


def load_yaml(stream):
    """``yaml.load(stream, OptionLoader)``."""
    return yaml.load(stream, Loader=OptionLoader)
