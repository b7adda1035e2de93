"""Pipeline stages, one module each (ftx.stage says what a stage declares; ftx.pipeline registers them)."""
