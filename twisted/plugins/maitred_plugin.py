from twisted.application.service import ServiceMaker

maitred = ServiceMaker(
    "maitred_tx ESMTP server", "maitred_tx.tap", "Receive mail over ESMTP/LMTP", "maitred"
)
