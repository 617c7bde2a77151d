"""jetflow's core: the pure domain (events, state machines, codec, subjects, scheduling,
retry policy) plus clearly separate adapter modules (``bus``, ``server``, ``client``,
``cli``) that the pure modules never import."""
