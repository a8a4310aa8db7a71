"""What runs on a compute node: the explore and label tasks that the stages submit, and their lock."""
