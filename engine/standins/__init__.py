"""Stand-ins for the hospital's RIS (an MLLP listener) and audit repository (a
syslog receiver over TCP or TLS), on 127.0.0.1: ``orthanc-ai demo`` runs them
to show where its HL7 and audit messages go, and the tests use them as real
peers. Not for production: they accept everything and keep it in memory."""
