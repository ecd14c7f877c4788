"""One file per schema revision, named after its revision id (0001, 0002, …); see midisc.store.schema."""
