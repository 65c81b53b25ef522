"""Jobs over finished adapters: generate (compare), evaluate, merge and combine, push to the Hub."""
