"""Tasks: what the model is asked to do, with an intervention active at the positions the method defines."""
