/// The constants of the NBD protocol (the NBD project's doc/proto.md) that `logpool serve`
/// speaks: fixed newstyle negotiation and the transmission phase with simple replies.
enum NBD {
    // Negotiation.
    static let initMagic: UInt64 = 0x4e42_444d_4147_4943  // "NBDMAGIC"
    static let optionMagic: UInt64 = 0x4948_4156_454F_5054  // "IHAVEOPT"
    static let optionReplyMagic: UInt64 = 0x0003_e889_0455_65a9

    static let flagFixedNewstyle: UInt16 = 1 << 0
    static let flagNoZeroes: UInt16 = 1 << 1
    static let clientFlagFixedNewstyle: UInt32 = 1 << 0
    static let clientFlagNoZeroes: UInt32 = 1 << 1

    enum Option: UInt32 {
        case exportName = 1, abort = 2, list = 3, startTLS = 5, info = 6, go = 7
        case structuredReply = 8, listMetaContext = 9, setMetaContext = 10
    }

    enum Reply: UInt32 {
        case ack = 1, server = 2, info = 3, metaContext = 4
        case errUnsupported = 0x8000_0001, errPolicy = 0x8000_0002, errInvalid = 0x8000_0003
        case errUnknown = 0x8000_0006, errTooBig = 0x8000_0009
    }

    static let infoExport: UInt16 = 0
    static let infoName: UInt16 = 1
    static let infoBlockSize: UInt16 = 3

    // Transmission flags.
    static let hasFlags: UInt16 = 1 << 0
    static let readOnly: UInt16 = 1 << 1
    static let sendFlush: UInt16 = 1 << 2
    static let sendFUA: UInt16 = 1 << 3
    static let sendTrim: UInt16 = 1 << 5
    static let sendWriteZeroes: UInt16 = 1 << 6
    static let canMultiConn: UInt16 = 1 << 8
    static let sendFastZero: UInt16 = 1 << 11

    // Requests and replies.
    static let requestMagic: UInt32 = 0x2560_9513
    static let simpleReplyMagic: UInt32 = 0x6744_6698
    static let requestHeaderByteCount = 28

    enum Command: UInt16 {
        case read = 0, write = 1, disconnect = 2, flush = 3, trim = 4, cache = 5, writeZeroes = 6, blockStatus = 7
    }

    // Structured replies.
    static let structuredReplyMagic: UInt32 = 0x668e_33ef
    static let replyFlagDone: UInt16 = 1 << 0
    static let replyTypeOffsetData: UInt16 = 1
    static let replyTypeBlockStatus: UInt16 = 5
    static let replyTypeError: UInt16 = (1 << 15) + 1

    /// The one metadata context served, and the id it is given.
    static let allocationContext = "base:allocation"
    static let allocationContextID: UInt32 = 1
    static let stateHole: UInt32 = 1 << 0
    static let stateZero: UInt32 = 1 << 1

    static let commandFUA: UInt16 = 1 << 0
    static let commandNoHole: UInt16 = 1 << 1
    static let commandReqOne: UInt16 = 1 << 3
    static let commandFastZero: UInt16 = 1 << 4

    // Errors (the protocol's fixed values, not the host's errno).
    static let eperm: UInt32 = 1
    static let eio: UInt32 = 5
    static let enomem: UInt32 = 12
    static let einval: UInt32 = 22
    static let enospc: UInt32 = 28
    static let enotsup: UInt32 = 95
    static let eshutdown: UInt32 = 108

    /// The largest request payload accepted (and advertised as the maximum block size).
    static let maximumPayload = 32 << 20
    /// Option data larger than this is refused (names are at most 4 KiB).
    static let maximumOptionData = 64 << 10
}
