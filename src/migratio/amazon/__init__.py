"""Amazon destinations: a Glance image turned into an AMI (EBS direct APIs or VM Import)."""
