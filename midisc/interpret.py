"""`python -m midisc.interpret`: the old name of `python -m midisc.concepts`, kept working with a notice.

"interpret" now belongs to auto-interpretation (explanations in words); testing concept texts is `concepts`.
"""

import runpy
import sys

if __name__ == "__main__":
    print("note: midisc.interpret is now midisc.concepts; running: python -m midisc.concepts "
          + " ".join(sys.argv[1:]), file=sys.stderr)
    sys.argv[0] = "python -m midisc.concepts"
    runpy.run_module("midisc.concepts", run_name="__main__", alter_sys=True)
