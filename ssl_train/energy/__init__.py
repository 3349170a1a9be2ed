"""Energy and carbon accounting: device meters, one meter actor per node, the ledger, the report."""
