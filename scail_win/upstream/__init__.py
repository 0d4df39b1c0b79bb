"""Where scail-win meets upstream code: the patches it applies (:mod:`.patches`)
and the SCAIL commits and sat versions it knows (:mod:`.versions`)."""
