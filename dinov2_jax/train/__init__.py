"""Training: schedules, optimizer, train state, the jitted step and the loop."""
