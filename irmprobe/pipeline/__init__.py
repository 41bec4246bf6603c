"""The stage graph: a Stage protocol (:mod:`.stage`), one runner (:mod:`.runner`), the graph
(:mod:`.graph`), one module per stage (:mod:`.stages`) and the control branch (:mod:`.control`)."""
