package main

import (
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
)

// TestDeleteResponse: the hand-encoded answer of "delete" is the task
// API's DeleteResponse of a killed task.
func TestDeleteResponse(t *testing.T) {
	at := time.Unix(1700000000, 123456789)
	data, err := deleteResponse(at)
	require.NoError(t, err)
	var r taskAPI.DeleteResponse
	require.NoError(t, proto.Unmarshal(data, &r))
	assert.Equal(t, uint32(137), r.ExitStatus)
	assert.Equal(t, uint32(0), r.Pid)
	assert.True(t, r.ExitedAt.AsTime().Equal(at))
	assert.Empty(t, r.ProtoReflect().GetUnknown())
}
