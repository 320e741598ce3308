"""What test files share (tiny models, config composition, command-line runs, injected faults), so that no test file
imports from another."""
