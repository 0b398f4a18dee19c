"""Few-shot classification: Siamese, Matching Networks, ProtoNet, RelationNet, MAML, Baseline/Baseline++."""
